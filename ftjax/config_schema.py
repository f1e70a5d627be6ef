"""The config schema as data: every key once, with its default, type, allowed values and meaning (`SCHEMA`), and
the constants defaults are built from (sharding rules, prompt templates, LoRA targets). `ftjax.config` builds,
validates and parses configs from it; `python -m ftjax config` prints it (docs/config.md).

Every key is part of the command-line surface (`--config.peft.lora.rank=16`): sweeps, docs and users' scripts
depend on these names, so rename nothing; add keys instead.
"""
from ftjax.config_checks import (AT_LEAST_2, AXIS_SIZE, BELOW_HALF, CHAT_TEMPLATE, DTYPES, FRACTION,
                                  FRACTION_BELOW_1, MULTIPLIERS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, REGEXES,
                                  REMAT, RULES, TARGETS, K, one_of)

RL_LOSSES = ('grpo', 'dr_grpo', 'dapo', 'bnpo')  # align.loss values trained on rollouts (ftjax/rl/)
LORA_TARGETS_ATTN_MLP = ['(q|k|v|o)_proj$', '(gate|up|down)_proj$']
DEFAULT_RULES = [  # logical axis -> mesh axes; first matching, unused mesh axis wins (flax semantics)
    ('activation_batch', ('data', 'fsdp', 'expert')),
    ('activation_length', 'context'),  # context parallelism: each row's sequence split (ftjax/models/context.py)
    # Block-boundary activations keep the embedding dim whole (Megatron style). Sharding it over
    # 'tensor' as well hits an XLA CPU SPMD miscompile on a data=2,fsdp=2,tensor=2 mesh (jax 0.10.2):
    # x[('data','fsdp'), None, 'tensor'] @ w['tensor', 'fsdp'] returns wrong rows.
    ('activation_embed', None), ('layers', None), ('vocab', 'tensor'), ('embed', ('fsdp', 'context')), ('embed_out', None),
    ('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('norm', None),
    ('expert', 'expert'),  # MoE: the stacked experts over mesh.expert (ftjax/models/moe.py)
]
ALPACA_TEMPLATE = (
    'Below is an instruction that describes a task, paired with an input that provides further context. '
    'Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
ALPACA_TEMPLATE_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
    '\n\n### Instruction:\n{instruction}\n\n### Response:\n')


SCHEMA = [
    # --- model ---
    K('model.path', None, 'base model: HF directory, .gguf file or hub name', kind=str, required=True),
    K('model.dtype', 'float32', 'compute dtype: float32 on CPU, bfloat16 on TPU/GPU', DTYPES),
    K('model.param_dtype', 'float32', 'storage dtype of trainable params (the master copy)', DTYPES),
    K('model.frozen_dtype', 'float32', "storage dtype of frozen params ('bfloat16' halves them)", DTYPES),
    K('model.quantize', 'none', 'frozen kernels and embeddings stored quantized (QLoRA), dequantized in the compute '
      'dtype at each matmul: int8 (per output channel), nf4 (4-bit NormalFloat, blocks of 64), gguf (the .gguf '
      "file's own blocks); what trains stays in param_dtype (ftjax/models/quantize.py)",
      one_of('none', 'int8', 'nf4', 'gguf')),
    K('model.quantize_double', False, 'nf4: quantize the block scales too (double quantization, 4.5 -> ~4.13 '
      'bits per weight)'),
    K('model.quantize_embedding', True, 'with model.quantize: the frozen token embedding too (in a tied model also '
      'the LM head); false keeps it in frozen_dtype, as bitsandbytes / PEFT QLoRA do (linear layers only)'),
    K('model.remat', 'full', "rematerialisation of each block ('full' was faster and smaller on CPU, "
      "docs/performance.md); presets and 'custom:layer_input=offload,qkv=device,...' save named tensors on the device "
      "or offload them to host memory (ftjax/config_checks.py REMAT_*)", REMAT),
    K('model.context_parallel', 'all_gather', 'attention across mesh.context: all_gather (every key/value gathered '
      'first) or ring (key/value blocks passed around with ppermute while computing)', one_of('all_gather', 'ring')),
    K('model.context_load_balance', True, 'with mesh.context > 1: zig-zag order of the sequence over the context '
      'shards, so that causal attention costs each shard the same (data.max_length: a multiple of 2 x mesh.context)'),
    K('model.moe_impl', 'ragged', 'mixture-of-experts MLPs (ftjax/models/moe.py): ragged (dropless: tokens sorted by '
      'expert, jax.lax.ragged_dot), dense (every expert on every token: the reference, for few experts) or capacity '
      '(a buffer of model.moe_capacity_factor x tokens x k / experts slots per expert, batched matmuls, the '
      'assignments past it dropped)', one_of('ragged', 'dense', 'capacity')),
    K('model.moe_capacity_factor', 1.25, "model.moe_impl='capacity': slots per expert = factor x tokens x k / "
      "experts (experts / k or more: nothing dropped); model.moe_dispatch='all_to_all': slots per shard = factor x "
      "tokens x k / mesh.expert (mesh.expert or more: nothing dropped)", POSITIVE),
    K('model.moe_dispatch', 'gather', "with mesh.expert > 1 (ftjax/models/moe.py): gather (each shard all-gathers "
      "its expert group's tokens and reduce-scatters the sums; dropless) or all_to_all (each assignment sent to its "
      "expert's shard only, model.moe_capacity_factor slots per shard, the rest dropped)",
      one_of('gather', 'all_to_all')),
    K('model.router_aux_loss_coef', None, "MoE: weight of the load-balancing loss added to the training loss "
      "(None: the checkpoint's router_aux_loss_coef)", NON_NEGATIVE, kind=float),
    K('model.router_z_loss_coef', 0.0, 'MoE: weight of the router z-loss (ST-MoE: mean logsumexp(router logits)^2)',
      NON_NEGATIVE),
    K('model.upcycle_experts', 0, 'sparse upcycling (ftjax/models/moe.py): turn the dense decoder into a MoE of '
      'this many experts, each a copy of its MLP (0: off)', NON_NEGATIVE),
    K('model.upcycle_top_k', 2, 'upcycling: experts per token (renormalised top-k: the upcycled model starts equal '
      'to the dense one)', POSITIVE_INT),
    K('model.upcycle_noise', 0.0, "upcycling: each expert's weights times (1 + noise x N(0, 1)) (0: exact copies)",
      NON_NEGATIVE),
    K('model.scan_unroll', 1, 'blocks unrolled per step of the layer scan', POSITIVE_INT),
    K('model.offload_frozen', False, "keep the layers' frozen weights in host memory (pinned_host) and copy each "
      'layer in inside the layer scan, one at a time (again in the backward pass when remat recomputes the '
      'block): a LoRA / QLoRA base larger than the device memory; embeddings, head and norms stay on the device'),
    K('model.kernels', 'auto', "matmul/attention/loss kernels (ftjax/models/kernels.py): 'auto' = 'cpu' on the "
      "CPU (custom VJPs), 'splash' on TPU, 'cudnn' on GPU; 'xla' = plain XLA everywhere",
      one_of('auto', 'cpu', 'xla', 'splash', 'cudnn')),
    K('model.num_labels', None, 'classification head size for encoders (None: no head)', POSITIVE_INT, kind=int),
    K('model.pooling', 'cls', 'how an encoder pools tokens for the classification head', one_of('cls', 'mean')),
    K('model.adapter', None, "start from a LoRA adapter: a PEFT adapter directory or a ftjax run's workdir "
      "(its latest checkpoint)", kind=str),
    K('model.adapter_merge', False, 'fold model.adapter into the frozen base at load: a new adapter trains on top '
      '(DPO from an SFT adapter: the adapters-off reference is then the SFT model)'),
    # --- peft ---
    K('peft.method', 'lora', 'what trains: everything, a selection, or LoRA / DoRA adapters',
      one_of('full', 'partial', 'lora', 'dora')),
    K('peft.trainable', [], 'extra regexes over parameter paths that train (partial, or on top of LoRA)',
      REGEXES, kind=list),
    K('peft.last_n_blocks', 0, 'partial: train the last N blocks', NON_NEGATIVE),
    K('peft.embeddings', False, 'partial: train the embeddings'),
    K('peft.norms', False, 'train every norm scale/bias'),
    K('peft.biases', False, 'BitFit: train every bias'),
    K('peft.head', True, 'train the classification head (when there is one)'),
    K('peft.lora.rank', 8, 'LoRA rank r', POSITIVE_INT),
    K('peft.lora.alpha', 16.0, 'LoRA scale alpha (updates are scaled by alpha / r; PEFT usual: 2 x rank)',
      POSITIVE),
    K('peft.lora.targets', LORA_TARGETS_ATTN_MLP, 'regexes over module paths that get adapters', TARGETS),
    K('peft.lora.dropout', 0.0, 'dropout on the adapter input', FRACTION_BELOW_1),
    K('peft.lora.rslora', False, 'rank-stabilised scale alpha / sqrt(r)'),
    K('peft.lora.lr_ratio', 1.0, 'LoRA+: learning rate of B = lr_ratio x learning rate of A', POSITIVE),
    # --- optim ---
    K('optim.name', 'adamw', 'optimizer', one_of('adamw', 'adafactor', 'sgd')),
    K('optim.learning_rate', 1e-4, 'peak learning rate', POSITIVE),
    K('optim.schedule', 'cosine', 'decay after warmup', one_of('cosine', 'linear', 'constant')),
    K('optim.warmup_steps', 0, 'linear warmup steps', NON_NEGATIVE),
    K('optim.end_lr_ratio', 0.0, 'final lr as a fraction of the peak (cosine, linear)', FRACTION),
    K('optim.weight_decay', 0.0, 'decoupled weight decay', NON_NEGATIVE),
    K('optim.no_decay', ['norm', 'bias$'], 'regexes over parameter paths with no weight decay', REGEXES),
    K('optim.b1', 0.9, 'adamw: first-moment decay', FRACTION_BELOW_1),
    K('optim.b2', 0.999, 'adamw: second-moment decay', FRACTION_BELOW_1),
    K('optim.eps', 1e-8, 'adamw: epsilon', POSITIVE),
    K('optim.momentum', 0.9, 'sgd: momentum (0 = none)', FRACTION_BELOW_1),
    K('optim.clip_norm', 1.0, 'global-norm gradient clipping; 0 disables', NON_NEGATIVE),
    K('optim.grad_accum', 1, 'micro-batches per step (the batch is split k ways inside the step)', POSITIVE_INT),
    K('optim.offload_state', False, 'keep the optimizer state in host memory (pinned_host) between steps; the '
      'step moves it to the device for the update only, after the backward pass has freed its activations '
      "(MaxText's optimizer_memory_host_offload; TPU, GPU and CPU)"),
    K('optim.lr_multipliers', [], "per-group learning rates, 'regex=multiplier' (the first match wins)",
      MULTIPLIERS, kind=list),
    # --- train ---
    K('train.steps', 100, 'optimizer steps', POSITIVE_INT),
    K('train.batch_size', 8, 'global batch in rows (all processes)', POSITIVE_INT),
    K('train.seed', 0, 'seed of init, dropout and data order', NON_NEGATIVE),
    K('train.log_every', 10, 'steps between metric lines', POSITIVE_INT),
    K('train.eval_every', 50, 'steps between evaluations', POSITIVE_INT),
    K('train.eval_batches', 8, 'batches per evaluation; 0 = the whole eval split', NON_NEGATIVE),
    K('train.checkpoint_every', 50, 'steps between checkpoints', POSITIVE_INT),
    K('train.keep_checkpoints', 2, 'latest checkpoints kept', POSITIVE_INT),
    K('train.keep_best_by', None, "also keep the best checkpoint by this metric, e.g. 'eval/loss'", kind=str),
    K('train.resume', True, 'resume from the workdir; False refuses a non-empty workdir'),
    K('train.nan_policy', 'halt', 'on a non-finite loss: stop, or skip the update', one_of('halt', 'skip')),
    K('train.max_nan_skips', 5, 'skip: halt after this many bad steps in a row', NON_NEGATIVE),
    K('train.loss_chunk', 512, 'LM loss over the vocabulary in chunks of this many tokens', POSITIVE_INT),
    K('train.resume_step', None, 'resume from this complete step instead of the latest (newer ones are moved to '
      'checkpoints_aside/)', NON_NEGATIVE, kind=int),
    K('train.allow_config_change', False, "continue a workdir's run with a config that differs from its "
      'config.json (the old one is kept as config.<time>.json)'),
    # --- eval: generation on held-out prompts (decoders) ---
    K('eval.generate', 0, 'answer this many eval prompts greedily before and after training; 0 = off',
      NON_NEGATIVE),
    K('eval.scorer', 'exact', "how an answer is scored (ftjax/eval/scores.py; last_number: GSM8K's final number, "
      'squad_*: SQuAD-normalised, bleu/chrf: sacreBLEU corpus score / 100)',
      one_of('exact', 'json', 'last_number', 'squad_em', 'squad_f1', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'chrf')),
    K('eval.max_new_tokens', 64, 'most new tokens per answer', POSITIVE_INT),
    K('eval.batch_size', 8, 'prompts per generation batch', POSITIVE_INT),
    K('eval.log_samples', 3, 'generations printed and written to TensorBoard', NON_NEGATIVE),
    K('eval.harness_tasks', [], 'lm-evaluation-harness tasks (names or YAML files) run on the fine-tuned model at '
      "the end of the run, results in the workdir's harness.json (ftjax/eval/harness.py; the eval extra)", kind=list),
    K('eval.harness_include_path', None, 'a directory of task YAMLs for eval.harness_tasks, e.g. '
      'experiments/eval_tasks', kind=str),
    K('eval.harness_limit', 0, 'examples per harness task; 0 = all', NON_NEGATIVE),
    # --- mesh ---
    K('mesh.data', -1, 'data-parallel axis size; -1: all devices not used by the other axes', AXIS_SIZE),
    K('mesh.fsdp', 1, 'fully-sharded data-parallel axis size (params sharded, batch split)', AXIS_SIZE),
    K('mesh.tensor', 1, 'tensor-parallel axis size', AXIS_SIZE),
    K('mesh.context', 1, 'context-parallel axis size: the sequence of every row split over it (attention across it: '
      'model.context_parallel); parameters are sharded over it too', AXIS_SIZE),
    K('mesh.expert', 1, 'expert-parallel axis size: MoE experts split over it (tokens gathered within an expert '
      'group, sums reduce-scattered back: ftjax/models/moe.py); data parallel everywhere else', AXIS_SIZE),
    K('mesh.rules', [list(r) for r in DEFAULT_RULES], 'logical axis -> mesh axes; the first matching, '
      'unused mesh axis wins', RULES),
    # --- align: preference optimisation (data.format='preference'; ftjax/objectives/preference.py) ---
    K('align.loss', 'dpo', 'preference loss: dpo (sigmoid), ipo, simpo (reference-free), orpo (SFT + odds ratio, '
      'reference-free); RL with verifiable rewards (ftjax/rl/): grpo (per-sequence token mean), dr_grpo (constant '
      'normaliser), dapo (token mean over the batch), bnpo (token mean per micro-batch)',
      one_of('dpo', 'ipo', 'simpo', 'orpo', 'grpo', 'dr_grpo', 'dapo', 'bnpo')),
    K('align.beta', 0.1, 'dpo / ipo / simpo: beta (dpo: KL strength; ipo: tau; simpo: reward scale, ~2); grpo '
      'losses: weight of the k3 KL to the reference, the starting model (align.reference; 0 = no reference, '
      'nothing computed)',
      NON_NEGATIVE),
    K('align.label_smoothing', 0.0, 'dpo / simpo: probability that a pair is flipped (conservative DPO)',
      BELOW_HALF),
    K('align.simpo_gamma', 0.5, 'simpo: target reward margin gamma', NON_NEGATIVE),
    K('align.orpo_lambda', 0.1, 'orpo: weight of the odds-ratio term beside the SFT loss', POSITIVE),
    K('align.reference', 'auto', 'dpo / ipo and grpo (beta > 0) reference: adapters_off (LoRA / DoRA: the base '
      'in the same step), precomputed (the starting model\'s log-probs: of every pair before training, cached; '
      'grpo: of each rollout, from a copy of the starting trainable weights), auto (by peft.method and '
      'model.adapter_merge)',
      one_of('auto', 'adapters_off', 'precomputed')),
    K('align.num_generations', 8, 'grpo: completions sampled per prompt (the group)', AT_LEAST_2),
    K('align.num_iterations', 1, 'grpo: optimizer steps on each rollout batch (mu), with the importance ratio '
      "against the rollout's log-probs", POSITIVE_INT),
    K('align.scale_rewards', 'group', 'grpo: advantages = reward - group mean, divided by the std of the group, '
      'of the batch, or not at all', one_of('group', 'batch', 'none')),
    K('align.epsilon', 0.2, 'grpo: clip range of the importance ratio, low side (1 - epsilon)', POSITIVE),
    K('align.epsilon_high', None, 'grpo: clip range, high side (1 + epsilon_high; DAPO clip-higher: 0.28); None = '
      'epsilon', POSITIVE, kind=float),
    K('align.importance_sampling_level', 'token', 'grpo: one ratio per token, or one per sequence (GSPO)',
      one_of('token', 'sequence')),
    K('align.rewards', [], "grpo: reward functions 'module:function' or built-in names (ftjax/rl/rewards.py), "
      'each reward(prompts, completions, **columns) -> list of floats', kind=list),
    K('align.reward_weights', [], 'grpo: one weight per reward function ([] = 1 each); the reward is the weighted '
      'sum', kind=list),
    # --- rollout: sampling completions for RL (align.loss grpo ...; ftjax/rl/rollout.py) ---
    K('rollout.prompts', 4, 'prompts per step; train.batch_size must be prompts x align.num_generations',
      POSITIVE_INT),
    K('rollout.max_new_tokens', 64, 'most new tokens per completion (dr_grpo: its normaliser)', POSITIVE_INT),
    K('rollout.temperature', 1.0, 'sampling temperature of the rollouts', POSITIVE),
    K('rollout.top_p', 1.0, 'nucleus filter of the rollouts (1 = none)', FRACTION),
    K('rollout.top_k', 0, 'top-k filter of the rollouts (0 = none)', NON_NEGATIVE),
    K('rollout.stop', [], 'stop strings: a completion ends at the first one (kept in its text)', kind=list),
    K('rollout.copy_layers', False, "false: the engine slices the trainer's stacked layer weights inside the "
      'decode program, so they exist once while rollouts sample; true: it decodes on per-layer copies (rollouts '
      '~1.3x faster on the CPU, +0.2 GiB peak for SmolLM2; docs/results/grpo_smollm2.md)'),
    # --- data: where it comes from ---
    K('data.path', None, "hub name, a file, a glob ('data/*.jsonl') or a directory", kind=str, required=True),
    K('data.name', None, "hub config name (e.g. 'sst2' of 'nyu-mll/glue')", kind=str),
    K('data.split', 'train', 'hub split, or the split of a directory holding train*/validation*/test* files'),
    K('data.cache_dir', None, "datasets' cache (None: ~/.cache/huggingface/datasets)", kind=str),
    K('data.num_proc', None, 'processes for tokenisation (None: this one)', POSITIVE_INT, kind=int),
    K('data.text_sample_by', 'document', '.txt files: one example per line, paragraph or file',
      one_of('line', 'paragraph', 'document')),
    # --- data: what an example looks like ---
    K('data.format', 'chat', 'how a row becomes tokens and an answer mask',
      one_of('alpaca', 'chat', 'prompt_completion', 'text', 'classification', 'preference')),
    K('data.fields.instruction', 'instruction', "alpaca: column of the instruction ('a|b': the first present)"),
    K('data.fields.input', 'input', 'alpaca: column of the optional input (missing or None: no input)'),
    K('data.fields.output', 'output', 'alpaca: column of the answer'),
    K('data.fields.messages', 'messages|conversations', 'chat: column of the list of {role, content}'),
    K('data.fields.role', 'role|from', "chat: key of the role inside a message (ShareGPT: 'from', human/gpt)"),
    K('data.fields.content', 'content|value', "chat: key of the text inside a message (ShareGPT: 'value')"),
    K('data.fields.prompt', 'prompt', 'prompt_completion, preference: column of the prompt (preference: text or '
      'a list of messages)'),
    K('data.fields.completion', 'completion', 'prompt_completion: column of the answer'),
    K('data.fields.chosen', 'chosen', 'preference: column of the preferred answer'),
    K('data.fields.rejected', 'rejected', 'preference: column of the dispreferred answer'),
    K('data.fields.text', 'text', 'text, classification: column of the text'),
    K('data.fields.text_pair', None, 'classification: column of the second sentence (None: single text)',
      kind=str),
    K('data.fields.label', 'label', 'classification: column of the label'),
    K('data.prompt_template', ALPACA_TEMPLATE, 'alpaca: prompt with {instruction} and {input}'),
    K('data.prompt_template_no_input', ALPACA_TEMPLATE_NO_INPUT,
      'alpaca: prompt of rows whose input is empty (None: prompt_template)', optional=True),
    K('data.prompt_separator', '', "prompt_completion: text appended to the prompt (e.g. '\\n'); no loss on it"),
    K('data.use_chat_template', False, 'alpaca / prompt_completion / preference (text prompt): render as a user + '
      'assistant turn'),
    K('data.chat_template', None, "chat / use_chat_template: None = the model's own, else its family's published "
      "format (Gemma, Qwen); a named format or a Jinja template overrides it", CHAT_TEMPLATE, kind=str),
    K('data.add_eos', True, 'alpaca / prompt_completion / text / preference: append EOS after the answer (it is '
      'learned)'),
    K('data.label_names', None, 'classification: string labels, index = class id', kind=list),
    K('data.num_labels', None, 'classification classes (None: len(label_names) or max label + 1)',
      POSITIVE_INT, kind=int),
    # --- data: length ---
    K('data.max_length', 512, 'tokens per row: the model sees [batch, max_length]', AT_LEAST_2),
    K('data.pad_to_multiple_of', 0, 'batches padded to the smallest multiple of this holding their longest row '
      '(at most max_length; each distinct length compiles once; dropout masks are drawn per shape, so with dropout '
      'a cut batch is another draw); 0 = every batch max_length. LM, classification, preference batches (not '
      'rollouts)', NON_NEGATIVE, kind=int),
    K('data.truncation', 'right', 'too long: keep the first tokens, keep the last (the answer survives), or '
      'drop the example (counted in stats)', one_of('right', 'left', 'drop')),
    K('data.packing', True, 'LM formats: several examples per row, attention and loss kept within each '
      '(preference: always one pair per row, its two sequences as two segments)'),
    K('data.text_chunking', True, 'text: concatenate all rows (EOS between) and cut max_length chunks'),
    K('data.text_stride', None, 'text chunks start every text_stride tokens (None: max_length)', POSITIVE_INT,
      kind=int),
    # --- data: bad rows (a missing field, a non-string, an empty answer, a label not in label_names) ---
    K('data.on_bad_row', 'error', 'error: stop, naming file, row and field; skip: count, log and leave out',
      one_of('error', 'skip')),
    K('data.max_bad_fraction', 0.01, 'skip: more bad rows than this fraction of the split is an error', FRACTION),
    # --- data: evaluation split: eval_path, else eval_split of path, else a held-out fraction of path ---
    K('data.eval_path', None, 'eval data: a file / glob / directory / hub name', kind=str),
    K('data.eval_split', None, "eval split, e.g. 'validation' (of eval_path, or of path)", kind=str),
    K('data.eval_fraction', 0.0, 'hold out this fraction of the train rows (seed-independent); 0 = no eval',
      FRACTION_BELOW_1),
    K('data.shuffle', True, 'a new seeded permutation of the rows every epoch'),
]
KEYS = {k.name: k for k in SCHEMA}
GROUPS = sorted({k.name.rsplit('.', i)[0] for k in SCHEMA for i in range(1, k.name.count('.') + 1)})
SECTIONS = {'model': 'The base model and its numerics.', 'peft': 'Which parameters train.',
            'optim': 'Optimizer and learning-rate schedule.', 'train': 'The training loop.',
            'eval': 'Generation-based evaluation on held-out prompts (decoders).',
            'mesh': 'Device mesh (data, fsdp, tensor, context) and sharding rules.',
            'align': 'Preference optimisation (DPO, IPO, SimPO, ORPO) on `data.format=preference` pairs, and RL '
                     'with verifiable rewards (GRPO, Dr. GRPO, DAPO, BNPO, GSPO) on prompts.',
            'rollout': 'Sampling the completions of RL (`align.loss` grpo, dr_grpo, dapo, bnpo).',
            'data': 'The data pipeline: source, format, length, bad rows, eval split.'}
