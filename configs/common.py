"""Shared config pieces: the full field list (each commented) and the model-size table.

Config files call `base()` and override what their run needs. Every field any code reads
is declared here, so `--config.x.y=...` typos fail loudly (the config is locked).
"""

import ml_collections

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff)
MODEL_SIZES = {
    "tiny": (32, 2, 4, 2, 64),  # tests: compiles in seconds
    "nano": (128, 4, 4, 4, 512),  # nanoGPT's Shakespeare CPU recipe
    "small": (256, 4, 4, 4, 768),  # the default CPU run
    "mini": (384, 6, 6, 6, 1024),  # 6L/384d benchmark size
    "125m": (768, 12, 12, 12, 2048),  # GPT-2 small scale (SwiGLU d_ff = 8/3 d)
    "350m": (1024, 24, 16, 16, 2816),  # GPT-2 medium scale
    "1b": (2048, 16, 16, 8, 5632),  # accelerator preset
    "7b": (4096, 32, 32, 32, 11008),  # Llama-2 7B's shape
}


def model_size(cfg: ml_collections.ConfigDict, name: str) -> None:
    if name not in MODEL_SIZES:
        raise ValueError(f"model size {name!r}: expected one of {sorted(MODEL_SIZES)}")
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = MODEL_SIZES[name]


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "causal"  # the training mode (a record in modes.MODES): 'causal' | 'mlm' | 'classify' | 'qa' | 'sft' |
    #                    'reward' | 'dpo' | 'grpo' | 'ppo'
    c.init_from = ""  # a run's workdir: warm start the backbone from its latest checkpoint (new runs only)
    c.seed = 0  # parameter init, dropout and data order

    c.model = m = ml_collections.ConfigDict()
    m.d_model = 256  # residual width
    m.n_layers = 4  # transformer blocks
    m.n_heads = 4  # query heads
    m.n_kv_heads = 4  # key/value heads (< n_heads: grouped-query attention)
    m.head_dim = 0  # per-head width; 0 = d_model // n_heads
    m.d_ff = 768  # feed-forward hidden width
    m.mlp = "swiglu"  # 'swiglu' (Llama) | 'gelu' (GPT-2)
    m.norm = "rms"  # 'rms' | 'layer' (pre-norm either way)
    m.norm_eps = 1e-6  # norm epsilon
    m.pos = "rope"  # 'rope' | 'learned' absolute positions
    m.max_len = 2048  # learned-position table size (pos='learned')
    m.rope_theta = 10000.0  # RoPE base frequency
    m.tie_embeddings = True  # LM head shares the token embedding
    m.use_bias = False  # biases in dense layers
    m.dropout = 0.0  # residual/attention/embedding dropout
    m.causal = True  # False: bidirectional attention (encoders)
    m.type_vocab_size = 0  # segment (token-type) embeddings: 2 for BERT-style sentence pairs; 0 = none
    m.dtype = "bfloat16"  # matmul operands: 'bfloat16' | 'float16' (+ dynamic loss scaling: optim.loss_scale_*;
    #                       GPUs without bf16, e.g. a T4) | 'float32'. f32 accumulation; params/activations f32
    # Deep models: scan_layers=True with remat='full' (24L/384d on CPU: compile 3x faster, XLA temp
    # memory 3.7x smaller, step 1.33x slower). Measured on XLA:CPU: scan without remat is 1.5-3.4x
    # slower, and remat without scan saves no memory (README Performance; benchmark --what=compile).
    m.scan_layers = False  # nn.scan over layers
    m.remat = "none"  # activation recomputation: 'none' | 'full' | 'dots'
    m.init_std = 0.02  # normal init std (residual outputs scaled by 1/sqrt(2 n_layers))
    m.vocab_multiple = 64  # pad the embedding rows to a multiple of this (padded logits masked)

    c.data = d = ml_collections.ConfigDict()
    d.path = ""  # .txt/.jsonl file or directory; '' = the Python standard library source
    d.text_field = "text"  # JSONL field holding the document text
    d.tokenizer = "byte"  # 'byte' | 'char' (char vocabulary built from the training split)
    d.seq_len = 256  # tokens per training window
    d.batch_size = 16  # global windows per optimizer step (split over grad_accum_steps)
    d.split = "hash"  # 'hash': whole documents by content hash | 'tail': last part of each document
    d.val_fraction = 0.05  # share of documents (or text, for 'tail') held out for validation
    d.answer_check = "exact"  # decoded answers vs references (modes sft, dpo, grpo, ppo; data/answers.py): 'exact'
    #                            text | 'final': the final answers ('#### 72', \boxed{}, the last number) by value

    c.mlm = k = ml_collections.ConfigDict()  # mode='mlm' only (data/mlm.py)
    k.nsp = True  # next-sentence prediction pairs <cls> A <sep> B <sep> + NSP head (needs model.type_vocab_size=2)
    k.nsp_pool = "first"  # the state the NSP head reads: 'first' (<cls>, BERT) | 'boundary' (the <sep> closing A)
    k.mask_prob = 0.15  # share of non-special tokens chosen for prediction
    k.mask_token_frac = 0.8  # of the chosen: replaced by <mask>
    k.random_token_frac = 0.1  # of the chosen: replaced by a random token (the rest stay unchanged)

    c.classify = q = ml_collections.ConfigDict()  # mode='classify' only (data/classify.py)
    q.val_path = ""  # validation JSONL; '' = hold out data.val_fraction of data.path by content hash
    q.strict = True  # a bad record (missing field, unknown validation label) raises naming file:line; False: count+skip
    q.freeze_backbone = False  # train only the classification head
    q.text_field = "text"  # the records' field holding the text (GLUE SST-2: 'sentence'; MNLI: 'premise')
    q.text_pair_field = "text_pair"  # the optional second text (MNLI: 'hypothesis'; QNLI: 'sentence')
    q.label_field = "label"  # the label's field (str or int values)
    q.minus_one_unlabelled = True  # label -1 = Hugging Face's "no label" (SNLI, GLUE test splits): left out, counted;
    #                                False: -1 is a class like any other (e.g. sentiment -1 / 0 / 1)

    c.sft = f = ml_collections.ConfigDict()  # mode='sft' only (data/sft.py, data/chat.py)
    f.val_path = ""  # validation chat JSONL; '' = hold out data.val_fraction of data.path by content hash
    f.train_on = "assistant"  # loss on 'assistant' tokens (content + closing <|end|>) | 'all' tokens
    f.too_long = "truncate"  # conversation > seq_len + 1 tokens: 'truncate' (counted) | 'drop' (counted)
    f.pack = True  # several whole conversations per row (segment ids: no cross-conversation attention/loss)
    f.fit = "first"  # packing: 'first' (first row with room, denser) | 'next' (streaming, order kept)
    f.strict = False  # a bad record raises naming file:line; False: count it under its reason and skip
    f.eval_generate = 64  # validation problems answered greedily at each eval for exact match; 0 = off
    f.max_new_tokens = 32  # generation length limit for that exact-match evaluation

    c.pref = p = ml_collections.ConfigDict()  # modes 'reward' and 'dpo': {"prompt","chosen","rejected"} JSONL
    p.val_path = ""  # validation pairs; '' = hold out data.val_fraction of data.path by content hash
    p.too_long = "truncate"  # a side over seq_len tokens: 'truncate' (its tail; counted) | 'drop' the pair (counted)
    p.strict = True  # a bad record raises naming file:line; False: count it under its reason and skip
    p.eval_generate = 0  # dpo: validation prompts answered greedily at each eval (exact match vs "answer"); 0 = off
    p.max_new_tokens = 16  # dpo: generation length limit of that evaluation

    c.reward = w = ml_collections.ConfigDict()  # mode 'reward' (objectives.reward)
    w.center_coef = 0.0  # reward-centering term coef * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023); 0 = off

    c.dpo = o = ml_collections.ConfigDict()  # mode 'dpo' (objectives.dpo, rl/losses.preference_loss)
    o.loss = "sigmoid"  # 'sigmoid' (DPO) | 'ipo' | 'robust' (label-flip robust) | 'simpo' (reference-free)
    o.beta = 0.1  # inverse temperature of the implicit reward (simpo: its beta, ~2)
    o.label_smoothing = 0.0  # 'sigmoid' (cDPO) / 'robust': assumed rate of flipped labels, in [0, 0.5)
    o.simpo_gamma = 0.5  # 'simpo': target reward margin
    o.nll_coef = 0.0  # + coef x the chosen response's mean token NLL (RPO, Pang et al. 2024; TRL's rpo_alpha); 0 = off

    c.rl = l = ml_collections.ConfigDict()  # modes 'grpo' and 'ppo' (rl/loop.py); data.path = prompts (data/prompts.py)
    l.val_path = ""  # held-out prompts for exact match; '' = hold out data.val_fraction of data.path by content hash
    l.strict = False  # a bad prompt record raises naming file:line; False: count it under its reason and skip
    l.group_size = 4  # completions sampled per prompt (GRPO's G); data.batch_size = prompts per iteration
    l.max_prompt_len = 96  # longer prompts are skipped (counted); rows are max_prompt_len + max_new_tokens wide
    l.max_new_tokens = 16  # completion length limit (finish 'length' = truncated)
    l.temperature = 1.0  # rollout sampling temperature (> 0)
    l.top_p = 1.0  # rollout nucleus sampling
    l.top_k = 0  # rollout top-k sampling; 0 = off (log-probs are always the unfiltered policy's)
    l.min_p = 0.0  # rollout min-p sampling (keep tokens with p >= min_p x the top one's); 0 = off
    l.epochs = 1  # passes over each iteration's rollouts
    l.minibatch = 0  # rows per optimizer update (divides batch_size x group_size); 0 = all rows in one update
    l.share_prompts = True  # the trainer computes a prompt once for its group (rl/groups.py) where updates hold
    # whole groups that split over the data-parallel devices; False: one model row per completion
    l.rewards = ("exact_match",)  # programmatic rewards added up (rl/rewards.py): 'exact_match', 'final_answer',
    #                               'format', or your own function (text, answer, finish, n_tokens) -> float as
    #                               'FILE.py:FUNCTION'
    l.reward_weights = ()  # one weight per rl.rewards entry (TRL's reward_weights); () = 1 each
    l.reward_model = ""  # a mode 'reward' run's workdir: its score is the reward (instead of rl.rewards)
    l.answer_field = "answer"  # the prompt records' field a reward checks against (e.g. 'solution'; dotted for
    #                            a nested one: verl's 'reward_model.ground_truth')
    l.ptx_coef = 0.0  # + coef x the mean token NLL of rl.ptx_rows SFT rows in every update (InstructGPT's PPO-ptx)
    l.ptx_path = ""  # chat JSONL (SFT records) those rows come from, rendered as mode 'sft' renders them
    l.ptx_rows = 8  # SFT rows (data.seq_len tokens) per update, drawn by (seed, iteration, epoch, update)
    l.length_penalty = 0.0  # reward -= coef * max(0, completion tokens - length_target)
    l.length_target = 0  # tokens a completion may use before the length penalty starts
    l.kl_coef = 0.04  # KL-to-reference coefficient (GRPO: beta in the loss; PPO: per-token reward penalty); 0 = no reference
    l.kl_estimator = "k3"  # 'k1' | 'k2' | 'k3' (Schulman's estimators of KL(policy || reference))
    l.kl_target = 0.0  # PPO: adapt kl_coef toward this KL per token (Ziegler et al. 2019); 0 = fixed coefficient
    l.kl_horizon = 10000.0  # PPO adaptive KL: horizon in rollout rows
    l.eps_low = 0.2  # clip range below 1 of the importance ratio
    l.eps_high = 0.2  # clip range above 1 (DAPO's clip-higher: 0.28)
    l.dual_clip = 0.0  # > 1: cap the loss of negative-advantage tokens at dual_clip * |A| (Ye et al. 2020); 0 = off
    l.aggregation = "sequence_mean"  # 'sequence_mean' (GRPO) | 'token_mean' (DAPO) | 'constant_norm' (Dr. GRPO)
    l.scale_rewards = "group"  # GRPO advantages divided by the 'group' | 'batch' reward std, or 'none' (Dr. GRPO)
    l.baseline = "mean"  # GRPO baseline: the group 'mean' | 'rloo' (leave-one-out mean)
    l.mask_truncated = False  # completions that hit max_new_tokens get no loss (DAPO's overlong filtering)
    l.critic = "shared"  # PPO critic: 'shared' (a value head on the policy's trunk) | 'separate' (its own transformer)
    l.gamma = 1.0  # PPO discount
    l.lam = 0.95  # PPO GAE lambda
    l.whiten_advantages = True  # PPO: advantages normalised over the iteration's completion tokens
    l.value_clip = 0.2  # PPO value-loss clip around the rollout's values; 0 = unclipped
    l.vf_coef = 0.1  # PPO value-loss weight
    l.entropy_coef = 0.0  # PPO entropy bonus weight
    l.eval_generate = 200  # held-out prompts answered greedily at each eval (exact match); 0 = off
    l.on_anomaly = "warn"  # guardrails (rl/guardrails.py): 'warn' | 'halt'
    l.kl_max = 10.0  # guardrail: KL per token above this
    l.min_length = 1.0  # guardrail: mean completion tokens below this
    l.entropy_floor = 1e-3  # guardrail: mean policy entropy below this
    l.value_loss_max = 1e3  # guardrail: PPO value loss above this
    l.logp_diff_warn = 0.01  # guardrail: mean sampler vs trainer log-prob gap above this (bf16 rounding: ~1e-3)

    c.lora = r = ml_collections.ConfigDict()  # low-rank adapters (model/lora.py); modes causal, sft, dpo, grpo, ppo
    #   (ppo: on the policy's trunk; value head and a separate critic trained whole; reference = the LoRA-off base)
    r.rank = 0  # adapter rank; 0 = off (train every weight)
    r.alpha = 16.0  # adapter scale alpha / rank
    r.targets = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate", "mlp/up", "mlp/down")  # kernels
    r.base_dtype = "float32"  # frozen base weights stored as 'float32' | 'bfloat16'
    r.train_new_rows = True  # also train a delta on the special tokens' embedding rows (new to a pretrained model)

    c.quant = z = ml_collections.ConfigDict()  # weight quantization (model/quantize.py); any mode but LoRA
    z.bits = 0  # 0 = off; 8 | 4: the transformer's dense kernels fake-quantized in the forward (QAT, straight-through)
    z.group = 0  # 0 = one scale per output channel; else one per `group` input rows (must divide every input dim)
    z.embed_bits = 8  # embedding / tied LM head while bits > 0: 0 = kept float, 8 | 4 (groups of `group` along d_model)
    z.stored = False  # int weights + scales ARE the params (written by scripts/quantize.py; inference only)
    z.act_scale = False  # a per-input-channel scale per kernel (AWQ, set by scripts/quantize.py --method=awq)

    c.prune = u = ml_collections.ConfigDict()  # gradual pruning while training, any mode (model/prune.py; one-shot:
    #                                             scripts/prune.py). Steps count optimizer updates
    u.method = "none"  # 'none' | 'magnitude' (unstructured, Zhu & Gupta 2017) | 'nm' (N:M structured, e.g. 2:4)
    u.sparsity = 0.5  # 'magnitude': target share of zeros in the pruned kernels, in [0, 1) ('nm': always 1 - n/m)
    u.initial_sparsity = 0.0  # sparsity at start_step; the cubic schedule ramps from it to the target
    u.start_step = 0  # first update that prunes (masks all ones before it)
    u.end_step = 0  # the update that reaches the target (masks fixed after it); 0 = the run's last update
    u.frequency = 100  # masks recomputed every this many updates from start_step (and at end_step)
    u.n = 2  # 'nm': weights kept in every group
    u.m = 4  # 'nm': group size, consecutive entries along a kernel's input dim (must divide it)
    u.scope = "layer"  # 'magnitude': the sparsity per 'layer' (each kernel) | 'global' (one threshold over all)
    u.include_embedding = False  # also prune the token embedding (the tied LM head) / an untied LM head
    u.include_heads = False  # also prune the output-side heads' kernels (MLM, classification, QA, reward, value)

    c.qa = a = ml_collections.ConfigDict()  # mode='qa' only (data/qa.py, data/qa_eval.py)
    a.val_path = ""  # validation JSONL; '' = hold out data.val_fraction of data.path by a hash of the context
    a.doc_stride = 64  # context tokens shared by consecutive windows over a long context (< the room per window)
    a.max_query_len = 32  # question tokens kept (the rest is cut)
    a.max_answer_len = 30  # longest predicted answer, in tokens (span decoding)
    a.strict = True  # a bad record (missing field, answer not at answer_start, no answer) raises naming file:line
    a.unanswerable = False  # SQuAD 2.0: records without answers are questions to answer with nothing (every window
    #                         labelled <cls>); False: such a record is a bad one
    a.null_threshold = 0.0  # unanswerable: answer nothing when the <cls> score beats the best span's by more than this

    c.continual = n = ml_collections.ConfigDict()  # continual learning from init_from (continual.py, data/mixture.py)
    n.init_state = "weights"  # what init_from gives a new run: 'weights' (warm start) | 'full' (+ the optimizer's
    #   state; this run counts its own steps from 0 and its LR schedule re-warms from 0: continual.py)
    n.replay_path = ""  # the old domain's data (text / dir / JSONL / prepared dataset; sft: chat JSONL), its training
    #   share: the replayed rows and EWC's Fisher batches; '' = none
    n.replay_ratio = 0.0  # share of every batch's rows drawn from replay_path, in [0, 1) (grain weighted mixing)
    n.l2sp = 0.0  # L2-SP weight: + l2sp * sum (theta - theta_0)^2 over the params (theta_0: the run's start)
    n.ewc = 0.0  # EWC weight: + ewc * sum F (theta - theta_0)^2, F = diagonal empirical Fisher on replay_path
    n.fisher_batches = 8  # micro-batches of replay_path rows whose per-example squared gradients the Fisher averages

    c.optim = o = ml_collections.ConfigDict()
    # The update rule (optim.py; optimizer-state bytes of each in README, Optimizers). Each keeps the decay
    # mask, clipping, schedule, accumulation and pruning masks. 'adamw' | 'adafactor' (factored second
    # moments: ~no state for large matrices) | 'lion' (sign updates: lr 3-10x smaller than AdamW's, weight_decay
    # as much larger) | 'sgd' (momentum; lr ~100x AdamW's) | 'muon' (orthogonalised momentum for the blocks'
    # matrices, AdamW for embeddings, heads, norms, biases; one lr for both: see muon_rms)
    o.name = "adamw"
    o.lr = 1e-3  # peak learning rate
    o.schedule = "cosine"  # after warmup: 'cosine' | 'linear' | 'constant' | 'wsd'
    o.warmup_steps = 100  # linear warmup from 0
    o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    o.wsd_decay_fraction = 0.2  # 'wsd': share of post-warmup steps spent decaying
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.99  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.weight_decay = 0.1  # decoupled weight decay on kernels
    o.decay_embeddings = False  # also decay embedding tables
    o.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    o.grad_accum_steps = 1  # micro-batches per update (optax.MultiSteps)
    o.momentum = 0.9  # sgd: momentum (heavy ball; 0 = plain SGD, the buffer is kept)
    o.nesterov = False  # sgd: Nesterov momentum
    o.adafactor_min_dim = 128  # adafactor: factor a tensor's second moment when its two largest dims are >= this
    o.muon_beta = 0.95  # muon: momentum of the matrix updates (Nesterov)
    o.muon_rms = 0.2  # muon: RMS of each orthogonalised matrix update (0.2 ~ AdamW's, so optim.lr serves both
    #                   parts); 0 = optax's width scaling (then the matrices want lr ~0.02, far above AdamW's)
    # model.dtype='float16' only (bf16/f32 never scale): dynamic loss scaling (loss_scale.py). The loss is
    # multiplied by the scale before differentiation; a step whose scaled gradients overflow is skipped (not
    # counted by train.on_nonfinite) and halves the scale; after loss_scale_period finite steps it doubles.
    o.loss_scale_init = 2.0**15  # float16: initial loss scale (>= 1)
    o.loss_scale_period = 2000  # float16: consecutive finite steps before the scale doubles

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer updates (the LR schedule spans these)
    t.stop_after = 0  # stop with a checkpoint after this step (time-sliced jobs); 0 = run to train.steps
    t.log_every = 50  # train metrics + progress line
    t.eval_every = 250  # validation loss (and at the end)
    t.eval_batches = 20  # validation batches per evaluation (fewer if the split is small; 0 = all)
    t.checkpoint_every = 500  # checkpoint period (and always at the end)
    t.keep_checkpoints = 3  # checkpoints kept
    t.async_checkpoint = True  # write checkpoints in the background
    t.compile_cache_dir = ""  # JAX persistent compilation cache (resumes skip compiling); '' = off
    t.on_nonfinite = "skip"  # non-finite loss/grads (the update is always dropped): 'skip' | 'rollback' | 'halt'
    t.max_nonfinite = 10  # stop once more updates than this were dropped in all
    t.rollback_lr_factor = 0.5  # 'rollback': LR multiplier applied at each rollback
    t.preflight = True  # estimate bytes per device at start-up (preflight.py); refuse a run that would not fit
    t.memory_limit_gb = 0.0  # the preflight's memory per device; 0 = the device's own (CPU: host RAM / devices)
    t.peak_flops = 9.2e11  # peak FLOP/s per device for MFU: 2-core CPU bf16 (scripts/benchmark.py --measure-peak)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data-parallel devices (-1: all that remain)
    c.mesh.fsdp = 1  # data-parallel devices that also shard params/optimizer state
    c.mesh.tensor = 1  # tensor-parallel devices
    # Several slices/hosts: the sizes above are then per slice (TPU multi-slice) or per host (GPU nodes), and
    # each axis spans dcn_<axis> of them over the slower data-center network (1 = stays inside one). Put
    # data parallelism there (dcn_data = slices/hosts); FSDP or tensor across hosts only on fast links.
    c.mesh.dcn_data = 1  # slices/hosts the 'data' axis spans
    c.mesh.dcn_fsdp = 1  # slices/hosts the 'fsdp' axis spans
    c.mesh.dcn_tensor = 1  # slices/hosts the 'tensor' axis spans

    # Multi-process start (sharding.initialize_distributed): every host runs the same train.py.
    c.dist = ml_collections.ConfigDict()
    c.dist.initialize = "auto"  # 'auto': join when an address/count is set or jax detects a multi-process
    # cluster (SLURM tasks, multi-host Cloud TPU VM); 'yes': always jax.distributed.initialize; 'no': never
    c.dist.coordinator_address = ""  # HOST:PORT of process 0's coordinator ('' = detect / JAX_COORDINATOR_ADDRESS)
    c.dist.num_processes = 0  # processes in all (0 = detect)
    c.dist.process_id = -1  # this process's index in [0, num_processes) (-1 = detect)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = (  # logical axis -> mesh axes
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
    )
    return c


def apply_arg(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
    """The `--config=file.py:ARG` variants every run file accepts: 'tiny' or a MODEL_SIZES name."""
    if arg == "tiny":
        tiny(c)
    elif arg in MODEL_SIZES:
        model_size(c, arg)
    elif arg:
        raise ValueError(f"config arg {arg!r}: expected nothing, 'tiny' or a size in {sorted(MODEL_SIZES)}")
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any config to a seconds-long smoke run (tests, `:tiny`)."""
    model_size(c, "tiny")
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.steps = 8
    c.train.log_every = 2
    c.train.eval_every = 4
    c.train.eval_batches = 2
    c.train.checkpoint_every = 4
    c.optim.warmup_steps = 2
    return c


def rl_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:tiny` RL run (grpo, ppo): a few seconds-long iterations of 4 prompts x 4 samples, from scratch."""
    c.init_from = ""
    c.data.batch_size = 4
    c.rl.group_size = 4
    c.rl.minibatch = 8
    c.rl.max_new_tokens = 8
    c.rl.eval_generate = 4
    c.train.steps = 4
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    return c
