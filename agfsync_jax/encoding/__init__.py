"""External image datasets -> the pair dataset through the VAE encoder (docs/external_datasets.md).

    source_rows     SourceRow / ImageRef / skip reasons: what every reader yields
    source_spec     the `encode` config's reader settings, checked
    record_fields   a record (JSONL object, parquet row, metadata line) -> SourceRow, by key
    jsonl_source    JSONL of (prompt, image) or (prompt, image 0, image 1[, label]) rows
    folder_source   image folders: HF ImageFolder metadata.jsonl, MJHQ-30K meta_data.json, .txt captions
    parquet_source  parquet files (pyarrow): bytes columns, HF Image structs, paths
    sources         the reader of `encode.format`
    preprocess      image bytes -> VAE input, as diffusers' VaeImageProcessor
    vae_encoder     the Flax VAE encoder -> UNet-space latents (posterior mean or sample), pure
    program         that function jitted over the mesh, compiled once
    records         an encoded row -> a pair record (SFT rows: kind "sft")
    stage           the `encode` stage
"""
