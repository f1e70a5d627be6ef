"""Hugging Face tensor names <-> ftjax parameter paths, in both directions.

One table per family lists (ftjax path, HF name, kind). Per-layer rows carry `{i}` and map to one
stacked leaf with a leading 'layers' axis. kind 'linear' transposes PyTorch's [out, in] to our
[in, out]. Loading asserts every expected name and shape; export writes the same names back.
"""
import numpy as np

from ftjax.errors import ModelError
from ftjax.tree import get_path

LINEAR, PLAIN = 'linear', 'plain'
EXPERTS = 'experts'  # [experts, out, in] per layer (one tensor, or one per expert: '{e}') -> [experts, in, out]
DECODERS = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
            'qwen3': 'Qwen3ForCausalLM', 'phi3': 'Phi3ForCausalLM', 'gemma2': 'Gemma2ForCausalLM',
            'gemma3_text': 'Gemma3ForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM',
            'qwen2_moe': 'Qwen2MoeForCausalLM', 'mixtral': 'MixtralForCausalLM', 'olmoe': 'OlmoeForCausalLM',
            'granitemoe': 'GraniteMoeForCausalLM'}  # model_type -> the exported transformers class
ENCODERS = {'bert': 'Bert', 'roberta': 'Roberta'}


def llama_table(cfg):
    """Every decoder family (`ftjax.models.decoder_config`): Phi-3's fused projections keep their fused
    names; Gemma's sandwich norms are post_attention_layernorm (after attention), pre_/post_feedforward_layernorm."""
    layer = 'model.layers.{i}.'
    rows = []
    attn = ('qkv', 'o') if cfg.fused_qkv else ('q', 'k', 'v', 'o')
    for p in attn:
        rows.append((('layers', f'{p}_proj', 'kernel'), layer + f'self_attn.{p}_proj.weight', LINEAR))
        if (cfg.qkv_bias and p != 'o') or (cfg.o_bias and p == 'o'):
            rows.append((('layers', f'{p}_proj', 'bias'), layer + f'self_attn.{p}_proj.bias', PLAIN))
    if cfg.num_experts:
        rows += moe_rows(cfg, layer)
    for p in () if cfg.num_experts else ('gate_up', 'down') if cfg.fused_gate_up else ('gate', 'up', 'down'):
        rows.append((('layers', f'{p}_proj', 'kernel'), layer + f'mlp.{p}_proj.weight', LINEAR))
        if cfg.mlp_bias:
            rows.append((('layers', f'{p}_proj', 'bias'), layer + f'mlp.{p}_proj.bias', PLAIN))
    if cfg.qk_norm:
        rows += [(('layers', f'{p}_norm', 'scale'), layer + f'self_attn.{p}_norm.weight', PLAIN) for p in 'qk']
    norms = {'attn_norm': 'input_layernorm', 'mlp_norm': 'post_attention_layernorm'}
    if cfg.post_norms:
        norms = {'attn_norm': 'input_layernorm', 'attn_post_norm': 'post_attention_layernorm',
                 'mlp_norm': 'pre_feedforward_layernorm', 'mlp_post_norm': 'post_feedforward_layernorm'}
    rows += [(('layers', ours, 'scale'), layer + f'{theirs}.weight', PLAIN) for ours, theirs in norms.items()]
    rows += [(('embed', 'embedding'), 'model.embed_tokens.weight', PLAIN),
             (('final_norm', 'scale'), 'model.norm.weight', PLAIN)]
    if not cfg.tie_embeddings:
        rows.append((('lm_head', 'kernel'), 'lm_head.weight', LINEAR))
    return rows


def moe_rows(cfg, layer):
    """The MoE MLP's rows, in each family's hub layout (what `save_pretrained` writes; transformers 5 fuses the
    experts only in memory)."""
    moe = ('layers', 'moe')
    if cfg.model_type == 'granitemoe':  # stacked tensors: input_linear [experts, 2 mlp, embed] (gate first)
        pre = layer + 'block_sparse_moe.'
        return [(moe + ('router', 'kernel'), pre + 'router.layer.weight', LINEAR),
                (moe + ('gate_up_proj', 'kernel'), pre + 'input_linear.weight', EXPERTS),
                (moe + ('down_proj', 'kernel'), pre + 'output_linear.weight', EXPERTS)]
    if cfg.model_type == 'mixtral':
        pre = layer + 'block_sparse_moe.'
        names = {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}
    else:
        pre = layer + 'mlp.'
        names = {p: p for p in ('gate_proj', 'up_proj', 'down_proj')}
    rows = [(moe + ('router', 'kernel'), pre + 'gate.weight', LINEAR)]
    rows += [(moe + (ours, 'kernel'), pre + 'experts.{e}.' + theirs + '.weight', EXPERTS)
             for ours, theirs in names.items()]
    if cfg.shared_expert_size:
        rows += [(moe + (f'shared_{p}', 'kernel'), pre + f'shared_expert.{p}.weight', LINEAR)
                 for p in ('gate_proj', 'up_proj', 'down_proj')]
        rows.append((moe + ('shared_expert_gate', 'kernel'), pre + 'shared_expert_gate.weight', LINEAR))
    return rows


def bert_table(cfg, prefix=''):
    layer = prefix + 'encoder.layer.{i}.'
    rows = [(('token_embed', 'embedding'), prefix + 'embeddings.word_embeddings.weight', PLAIN),
            (('position_embed', 'embedding'), prefix + 'embeddings.position_embeddings.weight', PLAIN),
            (('type_embed', 'embedding'), prefix + 'embeddings.token_type_embeddings.weight', PLAIN),
            (('embed_norm', 'scale'), prefix + 'embeddings.LayerNorm.weight', PLAIN),
            (('embed_norm', 'bias'), prefix + 'embeddings.LayerNorm.bias', PLAIN)]
    linears = {'q_proj': 'attention.self.query', 'k_proj': 'attention.self.key', 'v_proj': 'attention.self.value',
               'o_proj': 'attention.output.dense', 'up_proj': 'intermediate.dense', 'down_proj': 'output.dense'}
    for ours, theirs in linears.items():
        rows.append((('layers', ours, 'kernel'), layer + theirs + '.weight', LINEAR))
        rows.append((('layers', ours, 'bias'), layer + theirs + '.bias', PLAIN))
    for ours, theirs in {'attn_norm': 'attention.output.LayerNorm', 'mlp_norm': 'output.LayerNorm'}.items():
        rows.append((('layers', ours, 'scale'), layer + theirs + '.weight', PLAIN))
        rows.append((('layers', ours, 'bias'), layer + theirs + '.bias', PLAIN))
    return rows


def bert_head_table(cfg):
    """The sequence-classification head in the layout of transformers' ...ForSequenceClassification."""
    if cfg.model_type == 'bert':
        pooler, classifier = 'bert.pooler.dense', 'classifier'
    else:
        pooler, classifier = 'classifier.dense', 'classifier.out_proj'
    rows = [(('classifier', 'kernel'), classifier + '.weight', LINEAR), (('classifier', 'bias'), classifier + '.bias', PLAIN)]
    if cfg.pooling == 'cls':
        rows += [(('pooler', 'kernel'), pooler + '.weight', LINEAR), (('pooler', 'bias'), pooler + '.bias', PLAIN)]
    return rows


def bert_prefix(names, model_type):
    """'' for a bare BertModel checkpoint, 'bert.' / 'roberta.' for the task-head checkpoints."""
    for prefix in (f'{model_type}.', ''):
        if prefix + 'embeddings.word_embeddings.weight' in names:
            return prefix
    return f'{model_type}.' if any(n.startswith(model_type + '.') for n in names) else ''


def table(cfg, names=()):
    if cfg.family == 'llama':
        return llama_table(cfg)
    return bert_table(cfg, bert_prefix(set(names), cfg.model_type))


# --- the modules of the transformers class an ftjax model exports to (and a peft adapter names) -------------


def hf_rows(cfg):
    """(body rows, head rows) of (ftjax path, HF tensor name, kind), named as the exported transformers class."""
    if cfg.family == 'llama':
        return llama_table(cfg), []
    if not cfg.num_labels:
        return bert_table(cfg, ''), []
    if cfg.pooling != 'cls':
        raise ModelError(f"model.pooling={cfg.pooling!r}: transformers' {ENCODERS[cfg.model_type]}ForSequence"
                         f"Classification pools the first token, so a mean-pooling classifier has no Hugging Face "
                         f"equivalent to export to. Train with model.pooling='cls' to export it.")
    return bert_table(cfg, f'{cfg.model_type}.'), bert_head_table(cfg)


def linear_modules(rows):
    """{ftjax module path: HF module name} of the Dense layers; per-layer names keep their '{i}'."""
    return {path[:-1]: name[:-len('.weight')] for path, name, kind in rows if kind == LINEAR and path[-1] == 'kernel'}


def layer_names(template, num_layers):
    """[(layer index or None, HF module name)] for one module template."""
    if '{i}' in template:
        return [(i, template.format(i=i)) for i in range(num_layers)]
    return [(None, template)]


def architecture(cfg, hf_config):
    """The transformers class name of a model: 'LlamaForCausalLM', 'BertForSequenceClassification', ..."""
    if cfg.family == 'llama':
        return DECODERS.get(cfg.model_type, 'LlamaForCausalLM')
    model_type = hf_config.get('model_type', getattr(cfg, 'model_type', None))
    return ENCODERS[model_type] + ('ForSequenceClassification' if cfg.num_labels else 'Model')


# --- HF-named numpy arrays <-> the ftjax parameter tree ------------------------------------------------------


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _normalize_names(state_dict):
    """Old BERT checkpoints call LayerNorm's parameters gamma/beta."""
    return {k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias'): v
            for k, v in state_dict.items()}


def hf_to_params(state_dict, rows, expected, num_layers, source='checkpoint'):
    """Builds the ftjax parameter tree from HF-named numpy arrays.

    `expected` is the tree of ShapeDtypeStructs of the model; every row's tensor must exist and
    have exactly the expected shape, else a ValueError names the tensor and `source`.
    """
    state_dict = _normalize_names(state_dict)
    params = {}
    for path, name, kind in rows:
        want = get_path(expected, path).shape
        experts = want[1] if '{e}' in name else 0  # [layers, experts, in, out]

        def one(i):  # the tensor of layer i (all its experts stacked where they are stored apart)
            if experts:
                return np.stack([_orient(_fetch(state_dict, name.format(i=i, e=e), source), kind)
                                 for e in range(experts)])
            return _orient(_fetch(state_dict, name.format(i=i), source), kind)
        if '{i}' in name:
            arr = np.stack([one(i) for i in range(num_layers)])  # [layers, ...]
            label = name.format(i='*', e='*')
        else:
            arr = _orient(_fetch(state_dict, name, source), kind)
            label = name
        if tuple(arr.shape) != tuple(want):
            per_layer = want[1 + bool(experts):] if '{i}' in name else want  # what one stored tensor should be
            first = name.format(i=0, e=0)
            stored = tuple(np.shape(state_dict[first] if '{i}' in name else state_dict[name]))
            expect = tuple(per_layer[::-1] if kind == LINEAR else
                           (*per_layer[:-2], per_layer[-1], per_layer[-2]) if kind == EXPERTS else per_layer)
            raise ModelError(f"{source}: tensor {label!r} has shape {stored}, but the model config expects "
                             f"{expect} (ftjax parameter {'/'.join(path)}). Is config.json from the same model "
                             f"as the weights?")
        _set(params, path, arr)
    return params


def params_to_hf(params, rows, num_layers):
    """The inverse of `hf_to_params`: HF-named numpy arrays in PyTorch layout."""
    out = {}
    for path, name, kind in rows:
        arr = np.asarray(get_path(params, path))
        if '{e}' in name:
            for i in range(num_layers):
                for e in range(arr.shape[1]):
                    out[name.format(i=i, e=e)] = np.ascontiguousarray(_orient(arr[i, e], kind))
        elif '{i}' in name:
            for i in range(num_layers):
                out[name.format(i=i)] = np.ascontiguousarray(_orient(arr[i], kind))
        else:
            out[name] = np.ascontiguousarray(_orient(arr, kind))
    return out


def _fetch(state_dict, name, source):
    if name not in state_dict:
        close = [k for k in state_dict if k.split('.')[-2:] == name.split('.')[-2:]][:3]
        hint = f" Similar names present: {close}." if close else ''
        raise ModelError(f"{source}: missing tensor {name!r}.{hint} The checkpoint does not match the architecture "
                         f"in its config.json, or it is incomplete.")
    return state_dict[name]


def _orient(t, kind):
    t = np.asarray(t)
    return np.swapaxes(t, -1, -2) if kind in (LINEAR, EXPERTS) else t  # PyTorch's [.., out, in] <-> [.., in, out]
