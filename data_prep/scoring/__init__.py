"""The scoring stage (PyTorch): candidates in, scores and a preference-pair dataset out.

One job per module:

    device.py        cuda + float16 when a GPU is present, else cpu + float32
    scorer.py        the batched `Scorer` interface every scorer implements
    vqa.py           BLIP-2 VQA on the yes-questions (likelihood or generate-and-match)
    clip_score.py    CLIP score: 100 x cosine of the projected, normalised embeddings
    aesthetic.py     LAION aesthetic head on CLIP ViT-L/14 (scoring.aesthetic="laion")
    vila.py          VILA, the paper's aesthetic scorer: a TF SavedModel on the CPU (the default)
    pickscore.py     PickScore, an optional extra scorer selected by config
    hps.py           HPS v2 / v2.1 on open_clip: the paper's benchmark metric, extra or reward
    fingerprint.py   content digests of model files for scorer versions
    factory.py       the scorers a config asks for
    weights.py       score weights: presets ("paper", "released_code") or explicit
    candidates.py    manifest rows -> candidates of this shard; image/latent loading with reasons
    pairs.py         best/worst pair per prompt, InstructEngine cross pairs
    pair_records.py  pair -> tf.train.Example bytes, TFDS features, TFRecord shard writing
    tfds_metadata.py TFDS metadata so `tfds.builder_from_directory` loads WORKDIR/pairs
    tiny.py          tiny random scorer models (CLIP, BLIP-2 OPT/T5, aesthetic head, HPS, VILA)
    stage.py         `agfsync-jax score`: the resumable, shardable stage
"""
