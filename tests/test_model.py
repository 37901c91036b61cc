"""The model package: HF parity, KV-cache and ragged-batch generation, sampling, checkpoint I/O."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from llmctl.errors import InputError
from llmctl.model import transformer as transformer_module
from llmctl.model.checkpoint import WEIGHTS_INDEX_FILE, load_model_folder, save_model_folder
from llmctl.model.config import (
    PRESETS,
    ModelConfig,
    RopeScaling,
    flops_per_token,
    from_depth,
    num_params,
    preset,
    suggested_lr,
    token_budget,
)
from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.transformer import (
    IGNORE_INDEX,
    AttentionBlockFunction,
    Block,
    CrossEntropyFunction,
    KVCache,
    MLPBlockFunction,
    RMSNormFunction,
    RotaryFunction,
    SwiGLUFunction,
    Transformer,
    rope_tables,
)

torch.set_num_threads(2)
VOCAB = 320


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A test-1m model with non-trivial norms/biases and weights big enough to make greedy decode varied."""
    torch.manual_seed(seed)
    model = Transformer(preset("test-1m", vocab_size=VOCAB, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4)
    return model


def greedy_no_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


# ---- config ----------------------------------------------------------------------------------------


def test_presets_and_accounting():
    assert set(PRESETS) >= {"test-1m", "tiny", "gpt2-small", "350m", "1b"}
    for name in PRESETS:
        cfg = preset(name, vocab_size=1000)
        assert cfg.vocab_size == 1000
    assert 0.8e6 < num_params(preset("test-1m")) < 1.2e6
    assert 120e6 < num_params(preset("gpt2-small")) < 130e6
    assert 0.3e9 < num_params(preset("350m")) < 0.42e9
    assert 1.0e9 < num_params(preset("1b")) < 1.2e9
    # The analytic count equals the real module's count, tied and untied, with biases and QK-norm.
    for cfg in (
        preset("test-1m", attention_bias=True),
        preset("test-1m", tie_embeddings=False, qk_norm=True),
        from_depth(2, 500),
    ):
        model = Transformer(cfg)
        assert model.num_params() == num_params(cfg)
        assert model.num_params(non_embedding=True) == num_params(cfg, non_embedding=True)
    cfg = preset("gpt2-small")
    n = num_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.n_embd
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_from_depth_and_hf_config_round_trip():
    cfg = from_depth(12, vocab_size=50304)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.intermediate_size) == (768, 12, 64, 2048)
    big = from_depth(20, vocab_size=50304)
    assert (big.n_embd, big.head_dim, big.n_head) == (1280, 128, 10)
    assert suggested_lr(cfg) == pytest.approx(6e-4)
    assert token_budget(cfg) == 20 * num_params(cfg)
    long_context = RopeScaling("llama3", 8.0, original_max_position_embeddings=64)
    for c in (
        cfg,
        preset("1b"),
        preset("test-1m", attention_bias=True),
        preset("test-1m", qk_norm=True),
        preset("test-1m", rope_scaling=long_context),
        preset("test-1m", rope_scaling=RopeScaling("yarn", 4.0, 64, attention_factor=1.2)),
    ):
        assert ModelConfig.from_hf_config(c.to_hf_config()) == c
    with pytest.raises(InputError, match="supported: llama, mistral, qwen2"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(InputError, match="missing key 'hidden_size'"):
        ModelConfig.from_hf_config({"model_type": "llama", "vocab_size": 10})


# ---- (a) parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers_llama(tmp_path: Path, tie: bool):
    transformers = pytest.importorskip("transformers")
    model = make_model(tie_embeddings=tie)
    assert model.config.n_kv_head < model.config.n_head  # GQA
    save_model_folder(model, tmp_path, bos_token_id=1, eos_token_id=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # Loss: targets are next tokens; IGNORE_INDEX positions add nothing.
    targets = idx[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX
    with torch.no_grad():
        loss = model(idx[:, :-1], targets)
    ref = torch.nn.functional.cross_entropy(
        theirs[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(ref.item(), abs=1e-4)


def test_rms_norm_function_matches_autograd_of_plain_norm():
    """The CPU RMSNorm autograd Function: exact gradients (gradcheck, float64) equal to F.rms_norm's."""
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, w))
    grad = torch.randn(2, 3, 16, dtype=torch.float64)
    ours = RMSNormFunction.apply(x, w, 1e-6)
    plain = torch.nn.functional.rms_norm(x, [16], w, 1e-6)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(
        torch.autograd.grad(ours, (x, w), grad), torch.autograd.grad(plain, (x, w), grad)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_function_matches_f_cross_entropy(reduction: str):
    """The CPU cross-entropy Function (gradient computed in forward): gradcheck in float64, and the
    loss and gradients of F.cross_entropy with ignored targets, for grads of 1 and of 2.5."""
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    targets[:3] = IGNORE_INDEX
    ours = CrossEntropyFunction.apply(logits, targets, reduction)
    assert torch.autograd.gradcheck(lambda x: CrossEntropyFunction.apply(x, targets, reduction), (logits,))
    plain = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    torch.testing.assert_close(ours, plain)
    for scale in (1.0, 2.5):
        grad = torch.full_like(ours, scale)
        torch.testing.assert_close(
            torch.autograd.grad(ours, logits, grad, retain_graph=True),
            torch.autograd.grad(plain, logits, grad, retain_graph=True),
        )


def test_rotary_and_swiglu_functions_match_autograd_of_plain_formulas():
    """The CPU rotary (inverse-rotation backward) and SwiGLU (recomputing silu) Functions: gradcheck
    in float64, and the outputs and gradients of the plain formulas."""
    cos, sin = (t.double()[None, :, None] for t in rope_tables(8, 5, 10000.0))  # (1, T, 1, hd)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    gate, up = (torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k = torch.randn(2, 5, 1, 8, dtype=torch.float64, requires_grad=True)  # GQA: fewer kv heads
    assert torch.autograd.gradcheck(lambda x, k: RotaryFunction.apply(x, k, cos, sin), (x, k))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))
    cases = [
        (
            torch.cat([t.flatten() for t in RotaryFunction.apply(x, k, cos, sin)]),
            torch.cat([torch.addcmul(t * cos, t.roll(4, dims=-1), sin).flatten() for t in (x, k)]),
            (x, k),
        ),
        (SwiGLUFunction.apply(gate, up), torch.nn.functional.silu(gate) * up, (gate, up)),
    ]
    for ours, plain, inputs in cases:
        torch.testing.assert_close(ours, plain)
        grad = torch.randn_like(plain)
        torch.testing.assert_close(
            torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(plain, inputs, grad)
        )
    # Tables repeated per head, as the model passes them (k, with fewer heads, takes the first):
    # the same values and gradients as the broadcast tables.
    cos_h, sin_h = (t.expand(-1, -1, 3, -1).contiguous() for t in (cos, sin))  # (1, T, 3, hd)
    per_head = RotaryFunction.apply(x, k, cos_h, sin_h)
    broadcast = RotaryFunction.apply(x, k, cos, sin)
    grads = [torch.randn_like(t) for t in broadcast]
    for ours, plain in zip(per_head, broadcast, strict=True):
        torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(per_head, (x, k), grads), torch.autograd.grad(broadcast, (x, k), grads)
    )
    assert torch.autograd.gradcheck(lambda x, k: RotaryFunction.apply(x, k, cos_h, sin_h), (x, k))


@pytest.fixture(params=["math", "flash"])
def attention_kernel(request, monkeypatch):
    """The fused attention half's two kernels: batched products with saved probabilities (short
    sequences, as the tests' own, on more than one thread) or the CPU flash kernel (forced by a
    threshold of 0); checks afterwards that the intended kernel ran."""
    calls = []
    plain = transformer_module._causal_attention
    monkeypatch.setattr(transformer_module, "_causal_attention", lambda *a: calls.append(1) or plain(*a))
    if request.param == "flash":
        monkeypatch.setattr(transformer_module, "MATH_ATTENTION_MAX_T", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
    assert bool(calls) == (request.param == "math")


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("per_head_tables", [True, False], ids=["per-head", "broadcast"])
def test_fused_block_functions_have_exact_gradients(n_kv_head: int, per_head_tables: bool, attention_kernel):
    """The fused CPU training halves (x + attn(norm(x)), x + mlp(norm(x))): gradcheck in float64 for
    every input, GQA included, with rotary tables per head (as Transformer.forward passes them
    without position ids) and broadcast over heads (with position ids), through both attention
    kernels."""
    torch.manual_seed(0)
    B, T, C, H, hd, hidden = 2, 5, 16, 4, 4, 24

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    x, norm = leaf(B, T, C), leaf(C, scale=0.5)
    wq, wk, wv, wo = leaf(H * hd, C), leaf(n_kv_head * hd, C), leaf(n_kv_head * hd, C), leaf(C, H * hd)
    cos, sin = (t.double()[None, :T, None, :] for t in rope_tables(hd, T, 10000.0))  # (1, T, 1, hd)
    if per_head_tables:
        cos, sin = (t.expand(-1, -1, H, -1).contiguous() for t in (cos, sin))
    assert torch.autograd.gradcheck(
        lambda *a: AttentionBlockFunction.apply(*a, cos, sin, 1e-6, H), (x, norm, wq, wk, wv, wo)
    )
    w_gate, w_up, w_down = leaf(hidden, C), leaf(hidden, C), leaf(C, hidden)
    assert torch.autograd.gradcheck(
        lambda *a: MLPBlockFunction.apply(*a, 1e-6), (x, norm, w_gate, w_up, w_down)
    )


def _loss_and_grads(model: Transformer, batches) -> tuple[float, dict[str, torch.Tensor]]:
    """One backward over the summed losses of several forwards (as DPO's chosen and rejected)."""
    model.zero_grad(set_to_none=True)
    loss = sum(model(idx, targets) for idx, targets in batches)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_training_blocks_match_the_module_path(monkeypatch, dtype, n_kv_head, attention_kernel):
    """Training on CPU runs each block as the two fused Functions; loss and every gradient equal the
    module path's (Block._fused_weights forced to None), also with two forwards before one backward
    (their temporaries share buffers), through both attention kernels. Inference, LoRA's hooks and
    masks take the module path."""
    model = make_model(n_kv_head=n_kv_head).train().to(dtype)
    batches = [(torch.randint(0, VOCAB, (2, 24)), torch.randint(0, VOCAB, (2, 24))) for _ in range(2)]
    calls = []
    fused_apply = AttentionBlockFunction.apply
    monkeypatch.setattr(AttentionBlockFunction, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    fused_loss, fused_grads = _loss_and_grads(model, batches)
    assert len(calls) == 2 * model.config.n_layer  # the fused path ran, for every block
    with monkeypatch.context() as m:
        m.setattr(Block, "_fused_weights", lambda *a: None)
        plain_loss, plain_grads = _loss_and_grads(model, batches)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **tol, msg=name)

    calls.clear()
    idx, targets = batches[0]
    with torch.no_grad():
        model(idx, targets)
    model(idx, targets, attention_mask=torch.ones_like(idx))
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)
    model(idx, targets)
    handle.remove()
    assert len(calls) == model.config.n_layer - 1  # only the unhooked blocks of the last forward


def test_left_padded_batch_matches_unpadded_rows():
    model = make_model()
    rows = [torch.randint(0, VOCAB, (n,)) for n in (9, 4, 1)]
    T = 9
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    with torch.no_grad():
        batched = model(idx, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            torch.testing.assert_close(batched[i, T - len(r) :], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


def test_chunked_prefill_with_cache_matches_full_forward():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 20))
    cache = KVCache(model.config, 2, 32)
    with torch.no_grad():
        full = model(idx)
        a = model(idx[:, :7], cache=cache)
        b = model(idx[:, 7:15], cache=cache)
        c = model(idx[:, 15:16], cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full[:, :16], atol=1e-5, rtol=1e-5)
    assert cache.pos == 16


# ---- (b) generation ----------------------------------------------------------------------------


def test_kv_cache_greedy_equals_recompute_and_batched_equals_single():
    model = make_model()
    engine = Engine(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    batched = engine.generate(prompts, params)
    for prompt, result in zip(prompts, batched, strict=True):
        expected = greedy_no_cache(model, prompt, 16)
        assert result.tokens == expected
        assert engine.generate([prompt], params)[0].tokens == expected
        assert result.finish_reason == "length"
    assert len({tuple(r.tokens) for r in batched}) > 1  # the rows really differ


# ---- (c) sampling and stopping -----------------------------------------------------------------


def byte_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog, again and again."] * 20
    tok.train_from_iterator(text, vocab_size=VOCAB, min_frequency=1, show_progress=False)
    return tok


def test_seeded_sampling_is_reproducible_and_seed_matters():
    engine = Engine(make_model())
    prompts = [[1, 2, 3], [7, 8]]

    def run(seed):
        p = SamplingParams(
            max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=seed
        )
        return [r.tokens for r in engine.generate(prompts, p)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    assert engine.generate(prompts, greedy)[0].tokens == engine.generate(prompts, greedy)[0].tokens


def test_stop_token_and_stop_string_stop_generation():
    model = make_model()
    tok = byte_tokenizer()
    engine = Engine(model, tok)
    prompt = tok.encode("the quick").ids
    free = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0))[0]
    assert len(free.tokens) == 24 and free.text == tok.decode(free.tokens)

    # Stop token: the 6th generated token stops generation before it.
    stop_id = free.tokens[5]
    first = free.tokens.index(stop_id)
    r = engine.generate(
        [prompt], SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=(stop_id,))
    )[0]
    assert r.tokens == free.tokens[:first] and r.finish_reason == "stop"

    # Stop string: a piece of the free text; output is cut right before its first occurrence.
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    events = []
    r = engine.generate(
        [prompt],
        SamplingParams(max_new_tokens=24, temperature=0, stop_strings=(stop,)),
        on_token=events.append,
    )[0]
    assert r.finish_reason == "stop" and r.text == text[:cut]
    assert len(r.tokens) < 24 and free.tokens[: len(r.tokens)] == r.tokens
    assert "".join(e.text for e in events) == r.text  # streamed text adds up, stop string never shown
    assert events[-1].finish_reason == "stop"


def test_engine_input_errors():
    engine = Engine(make_model())
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.generate([[1] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        engine.generate([[1]], SamplingParams(stop_strings=("x",)))
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(temperature=-1)


# ---- (e) checkpoint folders --------------------------------------------------------------------


def test_loading_a_folder_neither_initialises_nor_imports_the_compiler(tmp_path: Path):
    """The empty model is built without weight init or rotary tables: on the meta device they ran
    torch's reference kernels, whose first call imports torch._dynamo (~1.7 s of every command)."""
    import subprocess
    import sys

    model = make_model(tie_embeddings=False)
    save_model_folder(model, tmp_path, eos_token_id=0)
    probe = (
        "import sys, torch\n"
        "from llmctl.model.checkpoint import load_model_folder\n"
        f"model, _ = load_model_folder({str(tmp_path)!r})\n"
        "print('torch._dynamo' in sys.modules, float(model.lm_head.weight.double().sum()),"
        " model.rope_cos.shape[0])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    dynamo, weight_sum, rope_rows = out.split()
    assert dynamo == "False"
    assert float(weight_sum) == pytest.approx(float(model.lm_head.weight.double().sum()), rel=0, abs=1e-9)
    assert int(rope_rows) == model.config.max_seq_len  # the loader computed the tables


def test_sharded_save_round_trips_and_transformers_loads_it(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    model = make_model(tie_embeddings=False, attention_bias=True)
    files = save_model_folder(model, tmp_path, max_shard_bytes=400_000, eos_token_id=0)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (tmp_path / WEIGHTS_INDEX_FILE) in files and not (tmp_path / "model.safetensors").exists()
    loaded, cfg = load_model_folder(tmp_path)
    assert cfg == model.config
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    # bf16 save: stored dtype recorded, loads back in bf16 by default.
    save_model_folder(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model_folder(tmp_path / "bf16")[0].lm_head.weight.dtype == torch.bfloat16


def test_load_errors_name_the_file(tmp_path: Path):
    with pytest.raises(InputError, match="model folder not found"):
        load_model_folder(tmp_path / "nope")
    save_model_folder(make_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="model.safetensors: cannot read"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(InputError, match=r"config.json:2: invalid JSON"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset("test-1m", vocab_size=VOCAB + 1).to_hf_config()))
    save_model_folder(make_model(), tmp_path / "w")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "w" / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match="has shape"):
        load_model_folder(tmp_path)


# ---- layering ------------------------------------------------------------------------------------


def test_model_package_imports_only_leaf_llmctl_modules():
    allowed = ("llmctl.errors", "llmctl.reporting", "llmctl.model")
    pkg = Path(__file__).resolve().parents[1] / "llmctl" / "model"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("llmctl"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_loss_with_ignored_targets_equals_the_full_computation():
    """The output layer runs only where there is a target; loss and gradients are those of computing
    every position's logits and ignoring the -100 ones."""
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=300, n_layer=2, n_embd=64))
    idx = torch.randint(0, 300, (3, 20))
    targets = torch.randint(0, 300, (3, 20))
    targets[:, :12] = -100  # a prompt
    targets[2, 15:] = -100  # padding
    for reduction in ("sum", "mean"):
        model.zero_grad()
        loss = model(idx, targets, reduction=reduction)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        logits = model(idx)
        ref = torch.nn.functional.cross_entropy(
            logits.view(-1, 300), targets.view(-1), ignore_index=-100, reduction=reduction
        )
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    none = model(idx, targets, reduction="none")
    assert none.shape == (3, 20) and bool((none[targets == -100] == 0).all())
