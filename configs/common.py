"""Defaults shared by every config; each config file starts from `base_config()` and overrides.

Building a config has no side effects: paths are strings, nothing is created or downloaded.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # A local diffusers-format folder (SD1.4/1.5 or SDXL layout). Empty with `tiny` set: the run
    # builds a tiny pipeline into WORKDIR/base_model and loads it from there.
    c.model.path = ""
    c.model.tiny = ""  # "" | "sd1" | "sdxl"
    # > 0: pretrain the tiny UNet into a denoiser of synthetic latents before use (configs/tiny.py;
    # agfsync_jax/models/tiny_pretrain.py says why). Part of the cached WORKDIR/base_model.
    c.model.tiny_pretrain_steps = 0
    c.model.tiny_pretrain_batch_size = 64
    c.model.tiny_pretrain_learning_rate = 1e-3
    c.model.param_dtype = "float32"  # master weights
    c.model.compute_dtype = "float32"  # "bfloat16" for bf16 activations and matmuls
    c.model.resolution = 512

    # --- device mesh -------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axes
    c.mesh.fsdp = 1  # -1: every device (parameters and optimizer state sharded over all of them)
    c.mesh.shard_params = "fsdp"  # "fsdp" | "replicate"
    # Kernels with fewer elements than this stay replicated: sharding them costs more in
    # collectives than it saves in memory.
    c.mesh.min_shard_size = 2**16

    # --- stage sharding (prep stages: --config.shard.index=i --config.shard.count=n) ----------
    c.shard = ml_collections.ConfigDict()
    c.shard.index = 0
    c.shard.count = 1

    # --- prompts (data_prep.prompts) ---------------------------------------------------------
    c.prompts = ml_collections.ConfigDict()
    c.prompts.source = "offline"  # "offline" | "llm" | "benchmark"
    c.prompts.per_category = 100  # prompts per category (offline and llm sources)
    c.prompts.min_questions = 5  # prompts left with fewer questions are dropped (counted)
    c.prompts.max_questions = 12  # upper end of the range the LLM is asked for
    # Drop questions whose `element` does not occur in the prompt (up to inflection).
    c.prompts.require_grounded_elements = True
    c.prompts.question_dedup_threshold = 0.9  # lexical similarity of two questions of a prompt
    c.prompts.instruction_pairs = 0  # InstructEngine pairs to add
    c.prompts.instruction_source = ""  # "" (same as source) | "offline" | "llm"
    c.prompts.benchmark = ml_collections.ConfigDict()
    c.prompts.benchmark.format = ""  # tifa_questions | tifa_text | drawbench | partiprompts | hpsv2 | text
    c.prompts.benchmark.path = ""
    c.prompts.benchmark.questions = "file"  # "file": as in the file (maybe none) | "llm": generate
    c.prompts.llm = ml_collections.ConfigDict()
    c.prompts.llm.backend = "openai"  # "openai" | "local"
    c.prompts.llm.base_url = "http://127.0.0.1:8000/v1"
    c.prompts.llm.model = ""
    c.prompts.llm.api_key_env = "OPENAI_API_KEY"  # "" for servers that need no key
    c.prompts.llm.local_path = ""
    c.prompts.llm.max_concurrency = 8
    c.prompts.llm.timeout_s = 60.0
    c.prompts.llm.max_retries = 5
    c.prompts.llm.backoff_initial_s = 1.0
    c.prompts.llm.backoff_max_s = 60.0
    c.prompts.llm.temperature = 0.9  # prompt and instruction writing
    c.prompts.llm.question_temperature = 0.2
    c.prompts.llm.max_tokens = 2048
    c.prompts.llm.prompts_per_request = 10
    c.prompts.llm.cache_dir = ""  # "" -> WORKDIR/prompts/llm_cache
    c.prompts.embedding_model_path = ""  # near-duplicate removal by embedding cosine when set
    c.prompts.dedup_threshold = 0.9

    # --- candidate sampling (agfsync_jax.sampling) -------------------------------------------
    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_candidates = 8
    c.sampling.noise_sigma = 0.1
    c.sampling.clean_first_candidate = False  # the authors' code keeps candidate 0 clean
    # Noise on SDXL's pooled text embedding. The authors' code adds unit-variance noise there
    # (1.0), which we treat as a bug (design.md section 10); 0 keeps it clean.
    c.sampling.pooled_noise_sigma = 0.0
    # The authors' code starts every prompt's candidate i from the same initial latents.
    c.sampling.shared_initial_latents = False
    c.sampling.scheduler = "ddim"  # ddim | dpm_solver | euler | pndm (diffusers' Flax ports)
    c.sampling.steps = 50
    c.sampling.guidance_scale = 7.5  # classifier-free guidance runs only for values > 1
    # Examples per compiled call, global; a multiple of (device count x microbatch).
    c.sampling.batch_size = 8
    # Examples per UNet call on one device. Results are bitwise reproducible across device
    # counts, batch sizes and resumption for a fixed microbatch (XLA picks kernels by shape);
    # raise it on accelerators for throughput (at most batch_size / device count).
    c.sampling.microbatch = 1
    # Parameter layout while sampling: "replicate", or "fsdp" (split over mesh.fsdp, for models
    # that do not fit on one device; XLA then splits some contractions across devices, so the
    # last bits depend on the mesh shape and the bitwise reproducibility above is lost).
    c.sampling.shard_params = "replicate"
    c.sampling.save_png = True
    # The UNet's attention kernel while sampling; the kinds are train.attention's.
    c.sampling.attention = "diffusers"

    # --- scoring and pairs (data_prep.scoring, PyTorch) --------------------------------------
    c.scoring = ml_collections.ConfigDict()
    # "paper" (0.35 VQA/0.55 CLIP/0.10 aesthetic) | "released_code" (0.85 CLIP/0.15 aesthetic)
    # | "custom" (then `weights`, e.g. "vqa=0.3,clip=0.5,aesthetic=0.1,pickscore=0.1")
    c.scoring.weights_preset = "paper"
    c.scoring.weights = ""
    c.scoring.vqa_path = ""  # BLIP-2 folder (paper: blip2-flan-t5-xxl)
    c.scoring.vqa_mode = "likelihood"  # "likelihood" (P(yes) vs P(no)) | "generate" (paper's accuracy)
    c.scoring.vqa_prompt = "Question: {question} Answer:"
    c.scoring.vqa_max_new_tokens = 8  # generate mode
    c.scoring.clip_path = ""  # CLIP folder (paper: clip-vit-base-patch16)
    c.scoring.aesthetic_clip_path = ""  # CLIP ViT-L/14 folder for the aesthetic head
    c.scoring.aesthetic_head_path = ""  # LAION aesthetic head weights (.pth or .safetensors)
    c.scoring.extra = ""  # comma-separated extra scorers, e.g. "pickscore"
    c.scoring.pickscore_path = ""  # PickScore_v1 folder (a CLIP model)
    c.scoring.pickscore_processor_path = ""  # its processor folder; "" -> pickscore_path
    c.scoring.device = "auto"  # "auto" (cuda + fp16 when present) | "cpu" | "cuda"
    # Build tiny random scorer models under WORKDIR/scores/tiny_models and use them (demo/tests).
    c.scoring.tiny = False
    c.scoring.batch_size = 16
    c.scoring.min_margin = 0.0  # prompts whose best and worst totals differ by less give no pair
    c.scoring.store_png = True

    # --- Diffusion-DPO training (agfsync_jax.training) ---------------------------------------
    c.train = ml_collections.ConfigDict()
    # dpo | cross_dpo (InstructEngine; every pair must be a cross pair) | sft (winners only) |
    # released_code_dpo (the authors' code: batch L2 norm, independent noise; they use beta=1).
    c.train.loss = "dpo"
    c.train.beta = 5000.0
    c.train.learning_rate = 5e-7
    c.train.warmup_steps = 0
    c.train.batch_size = 128  # pairs per optimizer step, global
    c.train.grad_accum_steps = 1
    c.train.steps = 1000
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-2
    c.train.grad_clip_norm = 1.0
    c.train.remat = False  # recompute UNet activations in the backward pass (less memory)
    c.train.remat_policy = "dots_with_no_batch_dims_saveable"  # a jax.checkpoint_policies name
    # What one checkpoint covers: "layers" (each resnet and transformer, like diffusers' PyTorch
    # gradient checkpointing; agfsync_jax/models/remat.py), "blocks" (each down/mid/up block) or
    # "unet" (the whole forward, recomputed before the backward: more FLOPs for the same or less
    # saving; compile-only plans in docs/performance.md).
    c.train.remat_scope = "layers"
    # "diffusers": the Flax UNet's own attention; "fused": the same math with a flash-style
    # backward; "dot_product": jax.nn.dot_product_attention (cuDNN on GPU, XLA elsewhere);
    # "flash": the platform's fused kernel (Pallas flash attention on TPU, cuDNN on GPU).
    # agfsync_jax/models/attention.py; what each saves: docs/performance.md.
    c.train.attention = "diffusers"
    c.train.prompt_dropout = 0.0  # probability of training a prompt as "" (unconditional)
    c.train.nonfinite = "skip"  # "skip" (count, keep params) | "stop"
    # "in_step": the step runs the frozen text encoders on token ids; "cached": each prompt is
    # encoded once outside the step and kept on the host (no encoder in the step).
    c.train.text_encoding = "in_step"
    c.train.shuffle_seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3

    # --- pre-flight plan (agfsync-jax plan --topology=...; agfsync_jax/plan) -----------------
    c.plan = ml_collections.ConfigDict()
    # Whose configs define the model when model.path is empty: "sd15" | "sdxl" (diffusers configs
    # shipped in agfsync_jax/plan/architectures; no weights needed) | "" (model.tiny's).
    c.plan.architecture = ""
    c.plan.programs = "train,sample"  # which programs to compile: train, sample or both
    # Model-FLOPs utilisation assumed for the wall-time estimate (an assumption, not a measurement).
    c.plan.assumed_mfu = 0.4
    # > 0: plan against this many GiB of HBM per device instead of the chip's (e.g. headroom).
    c.plan.hbm_gib = 0.0
    c.plan.hlo_dir = ""  # set: write each compiled program's optimised per-device HLO text there

    # --- export / eval -----------------------------------------------------------------------
    c.export = ml_collections.ConfigDict()
    c.export.step = -1  # -1: latest checkpoint
    c.export.flax_msgpack = False

    c.eval = ml_collections.ConfigDict()
    c.eval.prompts_path = ""  # "" -> the held-out tail of WORKDIR/prompts; else a benchmark file
    c.eval.prompts_format = ""
    c.eval.num_prompts = 64
    c.eval.seed = 200  # the paper's figure seed
    c.eval.grid_prompts = 8
    return c
