"""Exact speed-ups change the time a step takes, never what it computes."""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tunelab
from tunelab import speed


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if "loss" in h]


@pytest.mark.parametrize("task, kept", [("classification", "pooled"), ("ner", "hidden")])
def test_head_on_cached_features_trains_as_if_the_backbone_ran_every_step(task_config, tmp_path, task, kept):
    runs = {}
    for cache in (True, False):
        cfg = task_config(task)
        cfg.tuning.name, cfg.tuning.cache_features, cfg.train.epochs = "head", cache, 6
        cfg.tuning.head_solver = "sgd"  # the stepped head replays the cache every step (the solver reads it once)
        cfg.output, cfg.eval.bootstrap = str(tmp_path / f"run-{cache}"), 0
        runs[cache] = tunelab.train(cfg)
    # BERT's sequence classifier reads only the pooled output; a token classifier reads every hidden state
    assert runs[True].metrics["train"]["cached_features"] == kept
    assert runs[False].metrics["train"]["cached_features"] is None
    assert runs[True].metrics["train"]["fast_dropout"]  # the head's own dropout module
    cached, direct = _losses(tmp_path / "run-True"), _losses(tmp_path / "run-False")
    assert len(cached) == len(direct) == 72
    assert max(abs(a - b) for a, b in zip(cached, direct)) < 1e-5, (cached, direct)
    # the head did learn (equal curves are not two flat lines): an epoch's mean loss over the same examples fell
    assert sum(direct[-12:]) / 12 < sum(direct[:12]) / 12 - 0.02
    a, b = (load_file(str(tmp_path / f"run-{c}" / "model" / "model.safetensors")) for c in (True, False))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("task", ["classification", "ner"])  # the pooled output kept; every hidden state kept
def test_feature_cache_holds_the_eval_mode_backbone_outputs_in_every_batch(task_config, task):
    """The cache runs the frozen backbone without dropout in every batch: probing what the head reads after the
    first batch once put the backbone back into train mode, so later batches were cached with dropout on."""
    from tunelab.methods.features import cache_features, model_inputs
    from tunelab.pipeline import build_job
    from tunelab.validate import validate

    cfg = task_config(task)
    cfg.tuning.name = "head"
    validate(cfg)
    job = build_job(cfg, torch.device("cpu"))
    model, items = job.model, job.train_items[:24]
    model.train()
    assert model.config.hidden_dropout_prob > 0  # else dropout could not show
    modes = {name: m.training for name, m in model.named_modules()}
    cache = cache_features(job.task, model, items, job.pad_id, torch.device("cpu"), tokens=64)  # several batches
    assert cache is not None
    assert {name: m.training for name, m in model.named_modules()} == modes  # left as it was found
    base = getattr(model, model.base_model_prefix).eval()
    with torch.no_grad():
        for i, item in enumerate(items):
            out = base(**model_inputs(job.task, [item], job.pad_id, torch.device("cpu")))
            if cache.kept == "pooled":
                assert torch.allclose(cache.pooled[i], out.pooler_output[0], atol=1e-5), i
            else:
                assert torch.allclose(cache.hidden[i], out.last_hidden_state[0], atol=1e-5), i


@pytest.mark.parametrize("l1", [False, True])
def test_reused_embedding_gradient_equals_pytorchs_and_keeps_its_buffer(monkeypatch, l1):
    monkeypatch.setattr(speed, "LARGE", 0)  # the test table is small
    torch.manual_seed(0)
    reference = nn.Embedding(50, 8, padding_idx=0)
    fast = copy.deepcopy(reference)
    buffers = []
    # l1: a dense term on the same gradient, as the loop's L1 penalty adds (then no rows are tracked)
    with speed.reused_embedding_grads(fast, sole_writer=not l1) as tables:
        assert list(tables) == [fast.weight]
        for step in range(3):  # three steps of two accumulated micro-batches, with other ids each step
            micro_batches = [torch.randint(0, 50, (2, 4)), torch.tensor([[1, 1, 2 + step, 0]])]  # repeats, padding
            weights = [torch.randn(*x.shape, 8) for x in micro_batches]
            for model in (reference, fast):
                for x, w in zip(micro_batches, weights):
                    loss = (model(x) * w).sum()
                    ((loss + model.weight.abs().sum()) if l1 else loss).backward()
            assert torch.allclose(fast.weight.grad, reference.weight.grad, atol=1e-6)
            assert not fast.weight.grad[0].any()  # the padding row gets no gradient, as in PyTorch
            assert (fast._rows is None) == l1
            norms = (torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0),
                     speed.clip_grad_norm_(list(fast.parameters()), 2.0, tables))
            assert torch.allclose(*norms) and norms[0] > 2.0  # the clip did scale
            assert torch.allclose(fast.weight.grad, reference.weight.grad, atol=1e-6)
            buffers.append(fast.weight.grad.data_ptr())
            for model in (reference, fast):
                model.zero_grad(set_to_none=True)
        with torch.no_grad():  # no autograd, no custom backward: the plain lookup
            assert torch.equal(fast(micro_batches[0]), reference(micro_batches[0]))
    assert len(set(buffers)) == 1  # one buffer for the whole run
    assert "forward" not in vars(fast)  # the module is itself again after the block


def test_reused_embedding_gradient_of_a_tied_table_is_not_tracked_by_rows(monkeypatch):
    monkeypatch.setattr(speed, "LARGE", 0)
    torch.manual_seed(0)
    reference = nn.ModuleDict({"embed": nn.Embedding(20, 4), "head": nn.Linear(4, 20, bias=False)})
    reference.head.weight = reference.embed.weight  # tied, as a language model's output layer often is
    fast = copy.deepcopy(reference)
    x = torch.tensor([[1, 2, 3]])
    with speed.reused_embedding_grads(fast) as tables:
        for _ in range(2):
            for model in (reference, fast):
                model.head(model.embed(x)).logsumexp(-1).sum().backward()
            assert fast.embed._rows is None  # the head adds to every row
            speed.clip_grad_norm_(list(fast.parameters()), 0.1, tables)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
            assert torch.allclose(fast.embed.weight.grad, reference.embed.weight.grad, atol=1e-6)
            for model in (reference, fast):
                model.zero_grad(set_to_none=True)


def test_reused_embedding_gradient_leaves_frozen_and_subclassed_tables_alone(monkeypatch):
    monkeypatch.setattr(speed, "LARGE", 0)

    class Scaled(nn.Embedding):  # like Gemma's scaled word embeddings: its own forward must survive
        def forward(self, ids):
            return super().forward(ids) * 2.0

    frozen, scaled, plain = nn.Embedding(10, 4), Scaled(10, 4), nn.Embedding(10, 4)
    frozen.weight.requires_grad = False
    with speed.reused_embedding_grads(nn.ModuleList([frozen, scaled, plain])):
        assert [("forward" in vars(m)) for m in (frozen, scaled, plain)] == [False, False, True]


def _tiny_classifier(tiny_model: str, cls_name: str = "AutoModelForSequenceClassification"):
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = getattr(transformers, cls_name).from_pretrained(tiny_model, num_labels=3, hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = tok(["good film", "a bad and boring film it was", "fine"], padding=True, return_tensors="pt")
    return model, dict(batch)


def _logits_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every parameter's gradient of one labelled pass over `batch`."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_token_only_gives_a_sequence_classifier_the_same_logits_and_gradients(tiny_model):
    model, batch = _tiny_classifier(tiny_model)
    model.train()  # dropout is 0 here, so train mode is deterministic and both passes are comparable
    logits, reference = _logits_and_grads(model, batch)
    with speed.first_token_only(model, batch) as applied:
        assert applied
        assert "forward" in vars(model.bert.encoder.layer[-1])
        short_logits, short = _logits_and_grads(model, batch)
    assert "forward" not in vars(model.bert.encoder.layer[-1])
    assert torch.allclose(short_logits, logits, atol=1e-5)
    assert reference.keys() == short.keys()  # every weight still gets its gradient (the last layer's too)
    assert all(torch.allclose(short[n], reference[n], atol=1e-5) for n in reference)


def test_first_token_only_leaves_a_token_classifier_alone(tiny_model):
    model, batch = _tiny_classifier(tiny_model, "AutoModelForTokenClassification")
    with speed.first_token_only(model, batch) as applied:
        assert not applied  # its head reads every position: the probe's logits differ in shape
        assert "forward" not in vars(model.bert.encoder.layer[-1])


def _linears_patched(model: nn.Module) -> list[bool]:
    return [("forward" in vars(m)) for m in model.modules() if type(m) is nn.Linear]


def test_onednn_linears_give_the_same_logits_and_gradients_and_skip_frozen_weights(tiny_model):
    assert speed.onednn_available()  # in the pinned x86 PyTorch; without it the speed-up would be silently gone
    model, batch = _tiny_classifier(tiny_model)
    model.bert.encoder.layer[0].attention.self.query.weight.requires_grad = False  # as LoRA's frozen base layers
    model.train()
    logits, reference = _logits_and_grads(model, batch)
    with speed.onednn_linears(model, force=True) as applied:
        assert applied and all(_linears_patched(model))
        fast_logits, fast = _logits_and_grads(model, batch)
    assert not any(_linears_patched(model))  # the model is itself again after the block
    assert torch.allclose(fast_logits, logits, atol=1e-5)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in fast  # a frozen weight gets no gradient
    assert reference.keys() == fast.keys()
    assert all(torch.allclose(fast[n], reference[n], atol=1e-5) for n in reference)


def test_onednn_linears_nest_and_leave_other_dtypes_and_autocast_to_pytorch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    x = torch.randn(5, 16)
    double = copy.deepcopy(model).double()
    expected = double(x.double())  # PyTorch's own fp64 linear
    with speed.onednn_linears(model, force=True):
        with speed.onednn_linears(model, force=True) as inner:
            assert inner
        assert all(_linears_patched(model))  # the inner block left the outer block's layers as they were
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # autocast still applies: F.linear answered
        with speed.onednn_linears(double, force=True) as applied:
            assert applied and torch.equal(double(x.double()), expected)  # fp64 went to F.linear, bit for bit
    assert not any(_linears_patched(model))


@pytest.mark.parametrize("capability, vendor, env, pays", [
    ("AVX512", "AuthenticAMD", None, True),  # MKL runs its AVX2 code there: oneDNN measured 2x faster
    ("AVX2", "AuthenticAMD", None, False),  # Zen 3: as fast as MKL, whole runs slower
    ("AVX512", "GenuineIntel", None, False),  # MKL's own AVX-512 code: not measured faster
    ("AVX2", "AuthenticAMD", "1", True), ("AVX512", "AuthenticAMD", "0", False)])  # TUNELAB_ONEDNN overrides
def test_onednn_is_used_where_it_pays(monkeypatch, capability, vendor, env, pays):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(speed, "_cpu_vendor", lambda: vendor)
    if env is None:
        monkeypatch.delenv("TUNELAB_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_ONEDNN", env)
    speed.onednn_pays.cache_clear()
    try:
        assert speed.onednn_pays() is pays
        model = nn.Sequential(nn.Linear(4, 4))
        with speed.onednn_linears(model) as applied:
            assert applied is (pays and speed.onednn_available())
    finally:
        monkeypatch.undo()
        speed.onednn_pays.cache_clear()


def test_fast_dropout_zeroes_units_at_rate_p_scales_the_rest_and_routes_gradients_through_the_same_mask():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Dropout(0.1))
    x = (torch.rand(1000, 1024) + 0.5).requires_grad_()  # no zeros of its own
    with speed.fast_dropout(module) as applied:
        assert applied
        y = module(x)
    # the backward keeps one byte per unit, as uint8: PyTorch converts bools to floats ~5x slower at each use
    mask, = y.grad_fn.saved_tensors
    assert mask.dtype == torch.uint8 and mask.shape == x.shape
    kept = y != 0
    assert torch.equal(mask.bool(), kept)
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale)
    sigma = (0.1 * 0.9 / x.numel()) ** 0.5
    assert abs((~kept).float().mean().item() - 0.1) < 5 * sigma
    # each of the four units that share one 64-bit draw is dropped at rate p (a draw of 63 bits would not be)
    lanes = (~kept).reshape(-1, 4).float().mean(0)
    assert all(abs(rate - 0.1) < 5 * sigma * 2 for rate in lanes.tolist()), lanes
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.005  # the expected output is the input
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, torch.where(kept, g * scale, 0))
    assert not any("forward" in vars(m) for m in module.modules())  # restored after the block


def test_fast_dropout_follows_the_seed_and_leaves_eval_inplace_and_other_modules_to_pytorch():
    def masks(seed):
        torch.manual_seed(seed)
        with speed.fast_dropout(model):
            return model(torch.ones(64, 64)) == 0
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.3))
    nn.init.eye_(model[0].weight), nn.init.zeros_(model[0].bias)
    assert torch.equal(masks(1), masks(1)) and not torch.equal(masks(1), masks(2))  # resumable, seeded stream
    with speed.fast_dropout(model), torch.no_grad():
        model.eval()
        assert torch.equal(model(torch.ones(8, 64)), torch.ones(8, 64))  # eval: identity
    model.train()
    inplace = nn.Sequential(nn.Dropout(0.3, inplace=True))
    with speed.fast_dropout(inplace) as applied:
        assert applied
        torch.manual_seed(0)
        reference = nn.functional.dropout(torch.ones(32, 32), 0.3, True, True)
        torch.manual_seed(0)
        assert torch.equal(inplace(torch.ones(32, 32)), reference)  # in-place dropout: PyTorch's own
    with speed.fast_dropout(model, enabled=False) as applied:
        assert not applied and "forward" not in vars(model[1])


def test_fast_attention_drops_probabilities_with_the_fast_mask_and_respects_the_padding_mask():
    module = nn.Module()
    module.is_causal = False
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # the second example's last two positions are padding

    def attend(value, seed=7):
        torch.manual_seed(seed)
        out, _ = speed._attention(module, q, k, value, mask, dropout=0.25, scaling=0.5)
        return out
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.manual_seed(7)
    expected = (speed._Dropout.apply(scores, 0.25) @ v).transpose(1, 2)
    assert torch.allclose(attend(v), expected, atol=1e-6)
    assert not torch.allclose(attend(v), (scores @ v).transpose(1, 2))  # some probabilities were dropped
    padded = v.clone()
    padded[1, :, 3:] = 100.0  # what padding positions hold cannot matter
    assert torch.equal(attend(padded), attend(v))
    module.eval()  # evaluation (transformers passes dropout 0 there): its own SDPA
    out, _ = speed._attention(module, q, k, v, mask, dropout=0.0, scaling=0.5)
    assert torch.allclose(out, (scores @ v).transpose(1, 2), atol=1e-6)


def test_fast_dropout_takes_an_encoders_attention_dropout_off_sdpa_and_gives_it_back(tiny_model, tmp_path,
                                                                                   monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2, attn_implementation="sdpa")
    assert model.config.attention_probs_dropout_prob > 0
    batch = dict(AutoTokenizer.from_pretrained(tiny_model)(["a good film", "bad"], padding=True, return_tensors="pt"))
    sdpa = nn.functional.scaled_dot_product_attention
    dropped = []

    def watched(*args, dropout_p=0.0, **kwargs):
        dropped.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", watched)
    model.eval()
    reference = model(**batch).logits
    with speed.fast_dropout(model) as applied:
        assert applied and model.config._attn_implementation == speed.ATTENTION
        assert torch.allclose(model(**batch).logits, reference, atol=1e-6)  # eval: the same SDPA
        model.train()
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
        assert all(p == 0.0 for p in dropped)  # no training call reached SDPA with dropout
        assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
        model.save_pretrained(tmp_path / "saved")  # a checkpoint inside the block names no private attention
    assert model.config._attn_implementation == "sdpa"
    assert speed.ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    dropped.clear()
    model(**batch)
    assert dropped and all(p > 0 for p in dropped)  # after the block, SDPA's own dropout again


def _lora_model(tiny_model, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=["query", "value"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A's gradient zero too
            nn.init.normal_(p)
    batch = dict(AutoTokenizer.from_pretrained(tiny_model)(["a good film, really", "bad", "fine"], padding=True,
                                                          return_tensors="pt"))
    return model, batch


def _lora_logits_and_grads(model, batch, *blocks, seed: int = 5):
    model.zero_grad()
    torch.manual_seed(seed)
    with contextlib.ExitStack() as stack:
        applied = [stack.enter_context(block) for block in blocks]
        logits = model(**batch).logits
        if torch.is_grad_enabled():
            logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return applied, logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_gives_peft_logits_and_gradients(tiny_model, dropout):
    model, batch = _lora_model(tiny_model, dropout)
    model.train()
    # both with fast_dropout: peft's adapter dropout and the lean layer draw the same masks in the same order
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    ran, shares = [], []

    def record(module, args, out):
        ran.append(type(out.grad_fn).__name__)
        if ran[-1] == "_LoraLinearBackward":  # it keeps its input for the backward pass, not a dropped copy
            shares.append(out.grad_fn.saved_tensors[3].untyped_storage().data_ptr()
                          == args[0].untyped_storage().data_ptr())
    hook = query.register_forward_hook(record)
    (_, lean), logits, grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model),
                                                      speed.lean_lora(model))
    _, ref_logits, ref_grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model))
    hook.remove()
    assert lean and ran[0] == "_LoraLinearBackward" and ran[1] != ran[0]  # the lean layer ran, then peft's
    assert shares == [True]
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads) and any("lora_A" in n for n in grads)
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-6), n
        if "lora_" in n:
            assert grads[n].abs().sum() > 0, n  # the adapters do get gradients
    assert not any("forward" in vars(m) for m in model.modules())  # restored after the block
    with speed.fast_dropout(model), speed.lean_lora(model):
        with speed.lean_lora(model) as inner:
            assert inner  # the outer block's layers, left as they are
        model(**batch)  # and they still run once the inner block has closed
    model.eval()
    with torch.no_grad():
        (lean,), logits, _ = _lora_logits_and_grads(model, batch, speed.lean_lora(model))
        assert lean and torch.allclose(logits, model(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_runs_a_gated_mlp_as_one_function_with_peft_outputs_and_gradients(tiny_llama, dropout):
    """A Llama with LoRA on every linear layer: under lean_lora each MLP block runs `_LoraMLP`, which keeps two
    [tokens × intermediate] tensors for the backward pass (gate and up outputs) where the separate layers keep
    four; logits and every gradient equal peft's own layers' (both with fast_dropout: the same masks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(
        r=4, lora_dropout=dropout, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    mlp = model.base_model.model.model.layers[0].mlp
    inter = mlp.gate_proj.base_layer.out_features
    kept = []

    def record(module, args, out):
        if type(out.grad_fn).__name__ == "_LoraMLPBackward":
            kept.append(sum(t is not None and t.dtype == torch.float32 and t.shape == (27, inter)
                            for t in out.grad_fn.saved_tensors))
    hook = mlp.register_forward_hook(record)
    (_, lean), logits, grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model),
                                                      speed.lean_lora(model))
    _, ref_logits, ref_grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model))
    hook.remove()
    assert lean and kept == [2]  # the block ran as one function, keeping gate(x) and up(x) only
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads) and any("down_proj.lora_A" in n for n in grads)
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-6), n


def test_lean_lora_leaves_pytorch_dropout_merged_adapters_and_trainable_bases_to_peft(tiny_model):
    model, batch = _lora_model(tiny_model, 0.1)
    model.train()
    # PyTorch's dropout stream (no fast_dropout): peft's forward, bit for bit
    _, logits, grads = _lora_logits_and_grads(model, batch, speed.lean_lora(model))
    _, ref_logits, ref_grads = _lora_logits_and_grads(model, batch)
    assert torch.equal(logits, ref_logits) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    # a base layer that trains keeps its gradient (peft's forward computes it)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    query.base_layer.weight.requires_grad_(True)
    _, _, grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model), speed.lean_lora(model))
    _, _, ref_grads = _lora_logits_and_grads(model, batch, speed.fast_dropout(model))
    name = next(n for n in grads if n.endswith("layer.0.attention.self.query.base_layer.weight"))
    assert torch.allclose(grads[name], ref_grads[name], atol=1e-6) and grads[name].abs().sum() > 0
    query.base_layer.weight.requires_grad_(False)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: peft's forward, in bf16
        _, logits, _ = _lora_logits_and_grads(model, batch, speed.lean_lora(model))
        assert torch.equal(logits, model(**batch).logits)
    model.merge_adapter()  # merged: the base layer alone computes it
    with torch.no_grad():
        _, logits, _ = _lora_logits_and_grads(model, batch, speed.lean_lora(model))
        assert torch.equal(logits, model(**batch).logits)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_the_speedups_switch_turns_every_one_off_and_changes_no_loss(task_config, tmp_path, monkeypatch, request,
                                                                     tuning):
    """train.speedups false (or TUNELAB_SPEEDUPS=0) runs the model as PyTorch and peft do; without dropout (the
    fast masks are another random stream) the losses are the same to float rounding. The run with speed-ups has
    oneDNN's linears forced on (TUNELAB_ONEDNN=1), so that path is compared too, whatever this processor is."""
    monkeypatch.setenv("TUNELAB_ONEDNN", "1")
    speed.onednn_pays.cache_clear()
    request.addfinalizer(speed.onednn_pays.cache_clear)  # later tests decide again, without the variable
    losses, metrics = {}, {}
    for how in ("on", "off", "env"):
        cfg = task_config("classification")
        cfg.tuning.name, cfg.model.dropout, cfg.tuning.lora_dropout, cfg.output = tuning, 0.0, 0.0, str(tmp_path / how)
        cfg.train.speedups = how != "off"
        if how == "env":
            monkeypatch.setenv("TUNELAB_SPEEDUPS", "0")
        result = tunelab.train(cfg)
        losses[how], metrics[how] = _losses(tmp_path / how), result.metrics["train"]
    assert metrics["on"]["first_token_only"] and metrics["on"]["fast_dropout"], metrics["on"]
    assert metrics["on"]["lean_lora"] == (tuning == "lora")
    assert metrics["on"]["onednn_linears"] or not speed.onednn_available()  # a build without it cannot use it
    for how in ("off", "env"):
        assert not any(metrics[how][k] for k in ("first_token_only", "onednn_linears", "fast_dropout", "lean_lora"))
        assert losses[how] == pytest.approx(losses["on"], abs=1e-5)


def test_a_speedup_that_disagrees_on_the_first_batch_is_left_off_with_a_warning(tiny_model, monkeypatch, caplog):
    """lean LoRA is kept only where a training step on a probe batch equals peft's own: a wrong forward (as a
    future peft could make it) costs speed, never correctness."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3),
                           LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0,
                                      init_lora_weights=False))
    probe = dict(AutoTokenizer.from_pretrained(tiny_model)(["a good day", "bad"], padding=True, return_tensors="pt"))
    with speed.apply(model, probe, sequence=False) as fast:
        assert fast["lean_lora"]
    wrong = speed._LoraLinear.forward

    def off_by_a_little(ctx, x, weight, bias, lora_a, lora_b, scaling, p):
        return wrong(ctx, x, weight, bias, lora_a, lora_b, scaling * 1.01, p)

    monkeypatch.setattr(speed._LoraLinear, "forward", staticmethod(off_by_a_little))
    with caplog.at_level("WARNING", logger="tunelab.speed"), speed.apply(model, probe, sequence=False) as fast:
        assert not fast["lean_lora"]
    assert "lean_lora speed-up gave other outputs or gradients than peft" in caplog.text


def test_the_first_token_cut_passes_its_check_with_dropout_on(task_config, caplog):
    """The check compares passes without dropout: with attention dropout on, the cut draws fewer masks, and a check
    in training mode turned the cut off for every BERT run."""
    cfg = task_config("classification")
    cfg.train.epochs = 1
    with caplog.at_level("WARNING", logger="tunelab.speed"):
        metrics = tunelab.train(cfg).metrics["train"]
    assert metrics["first_token_only"] and "speed-up gave other outputs" not in caplog.text


def _llama_batch(tiny_llama, monkeypatch, lora: bool, rows: int, short_row: int, prompt: int):
    """The tiny Llama (LoRA on q and v, or full), the loss chunks cut to 5 labelled tokens, and a batch of `rows`
    rows of 12 random tokens, row `short_row` padded after position 7, the first `prompt` positions unlabelled:
    (model, inputs, labels, the trainable parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab import losses

    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 400 * 5)  # (the vocabulary is under 500)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, model.config.vocab_size, (rows, 12))
    mask = torch.ones_like(ids)
    mask[short_row, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return model, {"input_ids": ids, "attention_mask": mask}, labels, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [False, True])
def test_the_loss_from_hidden_states_equals_the_loss_from_the_logits(tiny_llama, monkeypatch, lora):
    """A chat batch (prompt tokens unlabelled, rows of different lengths) through `speed.causal_lm_loss`: from the
    hidden states in chunks of 5 labelled tokens, the summed loss, each row's loss, labelled and correct tokens and
    every trainable weight's gradient (the tied embedding's included) equal the logits path's."""
    model, inputs, labels, params = _llama_batch(tiny_llama, monkeypatch, lora, rows=3, short_row=1, prompt=4)

    def run(chunked: bool):
        total, *rows = speed.causal_lm_loss(model, inputs, labels, chunked)
        return total.detach(), rows, torch.autograd.grad(total, params)

    plain = run(False)
    assert speed.output_layer(model) is None  # undecided: not checked yet
    chunked = run(True)  # checked on the batch's first rows, then from the hidden states
    assert speed.output_layer(model) is model.get_output_embeddings()
    assert float(chunked[0]) == pytest.approx(float(plain[0]), rel=1e-6)
    assert [r.tolist() for r in chunked[1][1:]] == [r.tolist() for r in plain[1][1:]]  # tokens, correct
    assert plain[1][1].tolist() == [8, 4, 8]  # positions 4-11, 4-7 in the padded row
    assert torch.allclose(chunked[1][0], plain[1][0], atol=1e-5)
    for a, b in zip(chunked[2], plain[2]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_log_probabilities_from_hidden_states_equal_the_logits(tiny_llama, monkeypatch, lora):
    """`speed.causal_lm_logps` on a DPO-like batch (prompts unlabelled, a padded row), chunks of 5 labelled
    tokens: each row's summed log-probability and every trainable weight's gradient under a loss that weighs the
    rows differently (DPO's does) equal the logits path's."""
    from tunelab import losses

    model, inputs, labels, params = _llama_batch(tiny_llama, monkeypatch, lora, rows=4, short_row=2, prompt=5)

    def run(chunked: bool):
        logps = speed.causal_lm_logps(model, inputs, labels, chunked)
        chosen, rejected = logps.chunk(2)
        loss = losses.dpo(chosen, rejected, chosen.detach() - 0.3, rejected.detach() + 0.2, beta=0.5)
        return logps.detach(), torch.autograd.grad(loss, params)

    plain = run(False)
    chunked = run(True)
    assert speed.output_layer(model) is model.get_output_embeddings()
    assert torch.allclose(chunked[0], plain[0], atol=1e-5)
    for a, b in zip(chunked[1], plain[1]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_the_loss_from_hidden_states_is_checked_and_left_off_where_the_model_changes_its_logits(tiny_llama,
                                                                                               caplog):
    """A model that does something to the logits after its output layer (Gemma 2's soft-capping, here a scale)
    fails the probe check: its loss stays the logits' with a warning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    probe = {"input_ids": torch.randint(3, model.config.vocab_size, (2, 10)),
             "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with speed.apply(model, probe, sequence=False, causal_lm=True) as fast:
        assert fast["chunked_loss"] and speed.output_layer(model) is not None
    capped = AutoModelForCausalLM.from_pretrained(tiny_llama)
    forward = capped.forward

    def soft_capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    capped.forward = soft_capped
    with caplog.at_level("WARNING", logger="tunelab.speed"), \
            speed.apply(capped, probe, sequence=False, causal_lm=True) as fast:
        assert not fast["chunked_loss"] and speed.output_layer(capped) is None
    assert "would not be the loss from this model's logits" in caplog.text


@pytest.mark.parametrize("task", ["chat", "clm", "dpo"])
def test_a_language_model_trains_the_same_with_its_loss_from_hidden_states(lm_config, tmp_path, task):
    """chat, clm and dpo runs, speed-ups on (the loss or log-probabilities from the hidden states) and off: the
    same losses step by step and the same held-out figures, without dropout."""
    results = {}
    for on in (True, False):
        cfg = lm_config(task)
        cfg.train.speedups, cfg.output, cfg.model.dropout = on, str(tmp_path / f"{task}-{on}"), 0.0
        results[on] = tunelab.train(cfg)
    assert results[True].metrics["train"]["chunked_loss"] and not results[False].metrics["train"]["chunked_loss"]
    assert _losses(tmp_path / f"{task}-True") == pytest.approx(_losses(tmp_path / f"{task}-False"), abs=1e-5)
    for key in ("loss", "reward_accuracy" if task == "dpo" else "mean_token_accuracy"):
        assert results[True].metrics["eval"][key] == pytest.approx(results[False].metrics["eval"][key], abs=1e-5)
