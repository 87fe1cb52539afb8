"""raydpo.models: presets (tiny, smollm2-135m), loading, adapters, checks, sequence log-probs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the hub

import json
import shutil
import time

import pytest
import torch

from raydpo import models
from raydpo.data.schema import Catalog
from raydpo.errors import RaydpoError
from raydpo.prompt import encode_prompt, encode_response, render_prompt, user_message

WORDS_A = ["Shadow", "Light", "Wind", "Song", "Name"]
WORDS_B = ["Kings", "Ash", "Time", "Rivers", "Stone", "Ice", "Fire", "Glass", "Bones", "Salt"]
ODD_TITLES = (
    'Café — naïve 東京 🙂 "quoted"',
    "Spaced  double , comma ; and tab\tinside",
    "Dune (Dune Chronicles, #1)",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def catalog():
    titles = [f"The {a} of {b}" for a in WORDS_A for b in WORDS_B] + list(ODD_TITLES)
    return Catalog(titles=tuple(titles), genres=tuple(("fantasy",) for _ in titles))


@pytest.fixture(scope="module")
def tiny(catalog):
    """(path, build seconds, model, tokenizer) of the tiny preset for the test catalog."""
    t0 = time.perf_counter()
    path = models.build_tiny_model(catalog)
    seconds = time.perf_counter() - t0
    model, tok = models.load_model("tiny", catalog=catalog, device="cpu")
    return path, seconds, model, tok


# --- tiny preset ---------------------------------------------------------------------------------


def test_tiny_builds_quickly_and_is_small(tiny, catalog):
    path, seconds, model, tok = tiny
    assert path.parent == models.models_dir() and path.name.startswith("tiny-")
    assert str(path).startswith(os.environ["RAYDPO_CACHE_DIR"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", models.MARKER):
        assert (path / f).is_file(), f
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 10_000_000
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert model.config.vocab_size == len(tok)
    meta = json.loads((path / models.MARKER).read_text())
    assert meta["n_params"] == n_params and meta["n_titles"] == len(catalog)


def test_tiny_tokenizer_round_trips_titles_and_has_chatml_eos(tiny, catalog):
    _, _, model, tok = tiny
    for title in catalog.titles:
        ids = tok(title, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == title
    # byte-level: text never seen in training still round-trips, with no unknown token
    unseen = "Zoë's 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0 книга ~~ 42"
    assert tok.decode(tok(unseen, add_special_tokens=False)["input_ids"]) == unseen
    assert tok.unk_token is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # the BPE learned the catalog words: a frequent title word is a single token
    assert "ĠShadow" in tok.get_vocab()
    assert encode_response(tok, catalog.titles[0])[-1] == tok.eos_token_id


def test_tiny_chat_template_renders_via_prompt(tiny, catalog):
    _, _, _, tok = tiny
    history = list(catalog.titles[:3])
    prompt = render_prompt(tok, history)
    assert prompt == f"<|im_start|>user\n{user_message(history)}<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(tok, prompt)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == prompt


def test_tiny_cache_reuses_folder_and_weights(tiny, catalog, monkeypatch, tmp_path):
    path, _, model, tok = tiny
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*a, **k):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(models.tiny, "_build_tiny", no_rebuild)
    assert models.build_tiny_model(catalog) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    again, _ = models.load_model("tiny", catalog=catalog, device="cpu")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    monkeypatch.undo()

    # same inputs into another folder: same weights and tokenizer (fixed seed)
    other = models.build_tiny_model(catalog, out_dir=tmp_path / "copy")
    assert other == tmp_path / "copy"
    m2, t2 = models.load_model(str(other), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    assert t2.get_vocab() == tok.get_vocab()
    # another seed, another arch or another catalog: another cache entry
    seeded = models.build_tiny_model(catalog, seed=1)
    assert seeded != path
    m3, _ = models.load_model(str(seeded), device="cpu")
    assert not torch.equal(m3.model.embed_tokens.weight, model.model.embed_tokens.weight)
    small = models.build_tiny_model(catalog, num_hidden_layers=2)
    assert small not in (path, seeded)
    cat2 = Catalog(titles=catalog.titles[:-1], genres=catalog.genres[:-1])
    assert models.build_tiny_model(cat2) not in (path, seeded, small)
    with pytest.raises(RaydpoError, match="hidden_sise"):
        models.build_tiny_model(catalog, hidden_sise=64)


def test_load_model_tiny_defaults(tiny, catalog):
    model, tok = models.load_model("tiny", catalog=catalog)
    if not torch.cuda.is_available():
        assert model.dtype == torch.float32
        assert next(model.parameters()).device.type == "cpu"
    assert not model.training
    assert tok.padding_side == "left"
    m, _ = models.load_model("tiny", catalog=catalog, trainable=True)
    assert m.training
    m16, _ = models.load_model("tiny", catalog=catalog, dtype="bf16", device="cpu")
    assert m16.dtype == torch.bfloat16
    assert models.resolve_dtype("auto", "cpu") == torch.float32  # conftest: RAYDPO_CPU_BF16=0
    with pytest.raises(RaydpoError, match="needs the catalog"):
        models.load_model("tiny")
    with pytest.raises(RaydpoError, match="dtype 'float8'"):
        models.load_model("tiny", catalog=catalog, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(RaydpoError, match="CUDA is not available"):
            models.load_model("tiny", catalog=catalog, device="cuda")


def test_tiny_generates_and_batches_left_padded(tiny, catalog):
    _, _, model, tok = tiny
    prompts = [render_prompt(tok, catalog.titles[:1]), render_prompt(tok, catalog.titles[:6])]
    batch = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    assert (batch["input_ids"][0, 0] == tok.pad_token_id) and batch["attention_mask"][0, 0] == 0
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    # each row of the batch equals its own unpadded generation
    single = model.generate(**tok(prompts[0:1], add_special_tokens=False, return_tensors="pt"),
                            max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, -4:], single[0, -4:])


# --- adapters ------------------------------------------------------------------------------------


def _logits(model, tok, text):
    batch = tok([text], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_lora_adapter_loads_and_changes_logits_only_when_nonzero(tiny, catalog, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, _, base, tok = tiny
    text = render_prompt(tok, catalog.titles[:2]) + '"The Song'
    fresh, _ = models.load_model(str(path), device="cpu")
    peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "zero")  # lora_B starts at zero: the identity
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "nonzero")

    base_logits = _logits(base, tok, text)
    zero, _ = models.load_model("tiny", catalog=catalog, adapter=tmp_path / "zero", device="cpu")
    assert type(zero).__name__ == "PeftModelForCausalLM"
    assert not zero.training
    assert torch.allclose(_logits(zero, tok, text), base_logits, atol=1e-6)
    nonzero, _ = models.load_model("tiny", catalog=catalog, adapter=str(tmp_path / "nonzero"), device="cpu")
    assert (_logits(nonzero, tok, text) - base_logits).abs().max() > 1e-3
    assert not any(p.requires_grad for n, p in nonzero.named_parameters() if "lora_" in n)

    train, _ = models.load_model("tiny", catalog=catalog, adapter=tmp_path / "nonzero", trainable=True, device="cpu")
    assert train.training
    grads = {n: p.requires_grad for n, p in train.named_parameters()}
    assert any(v for n, v in grads.items() if "lora_" in n)
    assert not any(v for n, v in grads.items() if "lora_" not in n)


def test_missing_or_bad_adapter_is_named(tiny, catalog, tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(RaydpoError, match="no-such-adapter") as e:
        models.load_model("tiny", catalog=catalog, adapter=missing)
    assert "does not exist" in str(e.value)
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    with pytest.raises(RaydpoError, match="adapter_config.json"):
        models.load_model("tiny", catalog=catalog, adapter=empty)


# --- names and checks ----------------------------------------------------------------------------


def test_unknown_names_are_refused_before_loading(tmp_path):
    with pytest.raises(RaydpoError, match=r"unknown model 'tiny2'.*tiny, smollm2-135m"):
        models.load_model("tiny2")
    with pytest.raises(RaydpoError, match="no-such-dir"):
        models.load_model(str(tmp_path / "no-such-dir"))
    with pytest.raises(RaydpoError, match="unknown model"):
        models.load_model("./relative/missing")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(RaydpoError, match="no config.json"):
        models.load_model(str(tmp_path / "notamodel"))
    assert models.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not models.is_hub_id("a/b/c") and not models.is_hub_id("../x") and not models.is_hub_id("gpt2")
    # a plausible hub id is handed to transformers; offline and uncached it fails with our error
    with pytest.raises(RaydpoError, match="nobody-raydpo/not-a-model"):
        models.load_model("nobody-raydpo/not-a-model")


def test_tokenizer_without_eos_is_refused(tiny, tmp_path):
    path, _, _, tok = tiny
    import copy

    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(RaydpoError, match="no EOS token"):
        models.check_tokenizer(no_eos)
    models.check_tokenizer(tok)  # the real one passes

    # a model folder whose tokenizer has no EOS token fails at load time
    folder = tmp_path / "no-eos-model"
    shutil.copytree(path, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("eos_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RaydpoError, match="no EOS token"):
        models.load_model(str(folder))


def test_context_length_and_too_long_prompt(catalog):
    short_ctx = models.build_tiny_model(catalog, max_position_embeddings=96)
    model, tok = models.load_model(str(short_ctx), device="cpu")
    assert models.context_length(model) == 96
    prompts = [render_prompt(tok, catalog.titles[:1]), render_prompt(tok, catalog.titles[:2]),
               render_prompt(tok, catalog.titles[:40]), render_prompt(tok, catalog.titles[:45])]
    lengths = [len(encode_prompt(tok, p)) for p in prompts]
    assert lengths[1] + 8 <= 96 < lengths[2]
    assert models.check_prompt_lengths(tok, model, prompts[:2], max_new_tokens=8) == lengths[:2]
    with pytest.raises(RaydpoError, match=r"prompt 2 is too long") as e:
        models.check_prompt_lengths(tok, model, prompts, max_new_tokens=8)
    assert str(lengths[2]) in str(e.value) and "96" in str(e.value)
    # the generated tokens count too
    budget = 96 - lengths[1]
    models.check_prompt_lengths(tok, model, prompts[1:2], max_new_tokens=budget)
    with pytest.raises(RaydpoError, match="prompt 0"):
        models.check_prompt_lengths(tok, model, prompts[1:2], max_new_tokens=budget + 1)


# --- sequence log-probs --------------------------------------------------------------------------


def _manual_logprob(model, tok, prompt, response_ids):
    p_ids = encode_prompt(tok, prompt)
    ids = torch.tensor([p_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(p_ids) + j - 1, t].item() for j, t in enumerate(response_ids))


def test_sequence_logprobs_matches_per_example_computation(tiny, catalog):
    _, _, model, tok = tiny
    histories = [catalog.titles[:1], catalog.titles[3:9], catalog.titles[10:12], catalog.titles[20:35],
                 catalog.titles[-3:]]
    prompts = [render_prompt(tok, h) for h in histories]
    titles = [catalog.titles[40], catalog.titles[-1], "A title outside the catalog", catalog.titles[2], "X"]
    expected = torch.tensor([_manual_logprob(model, tok, p, encode_response(tok, t)) for p, t in zip(prompts, titles)])

    got = models.sequence_logprobs(model, tok, prompts, titles, batch_size=2)
    assert got.shape == (5,) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5), (got, expected)
    assert (got < 0).all()
    # token ids work as responses; the batch size does not change the result
    ids = [encode_response(tok, t) for t in titles]
    assert torch.allclose(models.sequence_logprobs(model, tok, prompts, ids, batch_size=5), expected, atol=1e-4)
    # a response without EOS scores differently (the EOS token's log-prob is part of the sum)
    no_eos = models.sequence_logprobs(model, tok, prompts[:1], [ids[0][:-1]])
    assert no_eos.item() > got[0].item()
    # with_grad keeps a graph for training
    g = models.sequence_logprobs(model, tok, prompts[:2], titles[:2], with_grad=True)
    assert g.requires_grad
    g.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(RaydpoError, match="2 prompts but 1 responses"):
        models.sequence_logprobs(model, tok, prompts[:2], titles[:1])


# --- SmolLM2-135M-Instruct -----------------------------------------------------------------------


def test_smollm2_gguf_is_located():
    path = models.smollm2_gguf_path()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_converts_once_and_matches_gguf(monkeypatch):
    t0 = time.perf_counter()
    path = models.smollm2_135m_path()
    convert_s = time.perf_counter() - t0
    assert path == models.models_dir() / "smollm2-135m-instruct" and (path / models.MARKER).is_file()
    assert not list(path.parent.glob(".smollm2-135m-instruct.tmp-*"))
    # converted once: a second call reuses the folder without touching the GGUF
    monkeypatch.setattr(models.smollm2, "load_smollm2_gguf", lambda: (_ for _ in ()).throw(AssertionError("reconverted")))
    assert models.smollm2_135m_path() == path
    t0 = time.perf_counter()
    model, tok = models.load_model("smollm2-135m", device="cpu")
    load_s = time.perf_counter() - t0
    monkeypatch.undo()
    print(f"\nsmollm2-135m: conversion {convert_s:.1f} s, load of the converted folder {load_s:.1f} s")

    cfg = model.config
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3 and cfg.vocab_size == 49152
    assert getattr(cfg, "quantization_config", None) is None
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134_515_008) < 100_000
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.dtype == torch.float32 and not model.training
    prompt = render_prompt(tok, ["The Hobbit", "Dune"])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")

    gguf_model, gguf_tok = models.load_smollm2_gguf()
    ids = encode_prompt(tok, prompt)
    assert ids == encode_prompt(gguf_tok, prompt)
    batch = torch.tensor([ids])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ours = model.generate(batch, attention_mask=torch.ones_like(batch), **kw)[0, len(ids):]
        ref = gguf_model.generate(batch, attention_mask=torch.ones_like(batch), **kw)[0, len(ids):]
        lp_ours = model(batch).logits[0, -1]
        lp_ref = gguf_model(batch).logits[0, -1]
    assert ours.tolist() == ref.tolist()
    assert len(ours) > 0
    assert torch.allclose(lp_ours, lp_ref, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_and_dtype_on_cuda(tiny, catalog):
    _, _, cpu_model, tok = tiny
    model, _ = models.load_model("tiny", catalog=catalog)
    assert next(model.parameters()).device.type == "cuda" and model.dtype == torch.bfloat16
    prompts = [render_prompt(tok, catalog.titles[:2]), render_prompt(tok, catalog.titles[5:9])]
    titles = [catalog.titles[10], catalog.titles[11]]
    gpu = models.sequence_logprobs(model, tok, prompts, titles)
    cpu = models.sequence_logprobs(cpu_model, tok, prompts, titles)
    assert gpu.device.type == "cpu"
    assert torch.allclose(gpu, cpu, rtol=0.05, atol=0.5)
