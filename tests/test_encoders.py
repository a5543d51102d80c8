"""Encoders: DPR input format and pooling, mean pooling, fingerprints, precision, bad models."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from rag_model.encoders import (
    MIN_PRECISION_COSINE,
    EncoderSpec,
    fingerprint_of,
    load_document_encoder,
    load_question_encoder,
    paired_question_encoder,
)
from storage.errors import RagindexError
from tests.fixtures.models import save_tiny_dpr_encoder, tiny_vocab, write_vocab

TITLES = ["Paris", "Jazz", "Chess", "Moon", "Python"]
TEXTS = [
    "paris is the capital of france",
    "jazz is a music genre that originated in new orleans and became popular during the early years "
    "of the century in america with many players and bands",
    "chess",
    "the moon orbits the earth and makes the ocean tides rise and fall each day",
    "python is a programming language",
]


@pytest.fixture
def dpr(tiny_dpr):
    return load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="fp32")


def _ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(words))


def test_shapes_and_dtypes(dpr, tiny_dpr):
    vectors = dpr.encode(TITLES, TEXTS, batch_size=2)
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    assert dpr.encode([], []).shape == (0, 32)
    question = load_question_encoder(str(tiny_dpr.question_dir))
    assert question.encode(["what is the capital of france"]).shape == (1, 32) == (1, question.dim)
    assert type(question.model).__name__ == "DPRQuestionEncoder"


def test_order_survives_length_sorting(dpr):
    together = dpr.encode(TITLES, TEXTS, batch_size=2)  # lengths differ: batches run longest first
    for i in range(len(TITLES)):
        alone = dpr.encode([TITLES[i]], [TEXTS[i]], batch_size=1)
        np.testing.assert_allclose(together[i], alone[0], atol=2e-5)
    # Different inputs really give different vectors, so the check above could fail.
    assert np.linalg.norm(together[0] - together[1]) > 1e-3


def test_dpr_input_is_cls_title_sep_text_sep_with_pooler_output(dpr):
    tok = dpr.tokenizer
    enc = dpr._tokenize(["Paris"], ["the capital of france"])
    cls_, sep = tok.cls_token_id, tok.sep_token_id
    title_ids, text_ids = _ids(tok, "paris"), _ids(tok, "the capital of france")
    assert enc["input_ids"][0] == [cls_, *title_ids, sep, *text_ids, sep]

    # The vector is DPR's pooler output for exactly those ids with all-zero segment ids (as DPR's
    # own generate_dense_embeddings and HF's RAG example feed it): the [CLS] state of the last layer.
    ids = torch.tensor([[cls_, *title_ids, sep, *text_ids, sep]])
    with torch.inference_mode():
        out = dpr.net(input_ids=ids)
        cls_state = dpr.net.ctx_encoder.bert_model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        cls_state = cls_state.last_hidden_state[:, 0]
        with_segments = dpr.net(input_ids=ids, token_type_ids=torch.tensor([enc["token_type_ids"][0]]))
    np.testing.assert_allclose(out.pooler_output.numpy(), cls_state.numpy(), atol=1e-6)
    np.testing.assert_allclose(dpr.encode(["Paris"], ["the capital of france"]), out.pooler_output.numpy(), atol=2e-5)
    assert not np.allclose(with_segments.pooler_output.numpy(), out.pooler_output.numpy(), atol=1e-3)


def test_long_text_is_truncated_to_max_length_keeping_the_title(dpr):
    long_text = " ".join(["river"] * 600)
    ids = dpr._tokenize(["Seine"], [long_text])["input_ids"][0]
    assert len(ids) == 256 and ids[-1] == dpr.tokenizer.sep_token_id
    title = _ids(dpr.tokenizer, "seine")
    assert ids[1:1 + len(title)] == title and ids[1 + len(title)] == dpr.tokenizer.sep_token_id
    assert dpr.encode(["Seine"], [long_text]).shape == (1, 32)


def test_mean_pooling_over_the_attention_mask(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    encoder = load_document_encoder(EncoderSpec(str(minilm_dir), kind="mean", normalize=False), precision="fp32")
    assert encoder.dim == 384 and encoder.fingerprint.pooling == "mean"
    got = encoder.encode(TITLES[:2], TEXTS[:2], batch_size=2)  # padded: the short one has masked positions
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    net = AutoModel.from_pretrained(minilm_dir).eval()
    for i in range(2):
        enc = tok(TITLES[i], TEXTS[i], return_tensors="pt", truncation=True, max_length=256)
        with torch.inference_mode():
            hidden = net(input_ids=enc["input_ids"]).last_hidden_state[0]
        np.testing.assert_allclose(got[i], hidden.mean(0).numpy(), atol=1e-4)
    normalized = load_document_encoder(EncoderSpec(str(minilm_dir), kind="mean", normalize=True), precision="fp32")
    unit = normalized.encode(TITLES, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert normalized.fingerprint.key != encoder.fingerprint.key


def test_minilm_passage_is_nearer_its_own_question(minilm_dir):
    spec = EncoderSpec(str(minilm_dir), kind="mean", normalize=True)
    docs = load_document_encoder(spec)
    assert paired_question_encoder(spec.model, "mean") == spec.model
    questions = load_question_encoder(spec.model, kind="mean", normalize=True)
    passages = docs.encode(
        ["Photosynthesis", "Mount Everest", "Jazz"],
        ["Plants use sunlight, water and carbon dioxide to produce glucose and release oxygen.",
         "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas.",
         "Jazz is a music genre that originated in the African-American communities of New Orleans."],
    )
    q = questions.encode(["How do plants make their food from light?", "What is the tallest mountain in the world?",
                          "Where did jazz music come from?"])
    scores = q @ passages.T
    assert list(scores.argmax(axis=1)) == [0, 1, 2]


def test_fingerprint_tracks_the_weights_not_the_location(tiny_dpr, tmp_path):
    from transformers import DPRContextEncoder

    original = fingerprint_of(EncoderSpec(str(tiny_dpr.ctx_dir)))
    assert (original.dim, original.pooling, original.kind, original.max_length) == (32, "pooler", "dpr", 256)
    assert len(original.weights_sha256) == 64

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dpr.ctx_dir, copy)
    moved = fingerprint_of(EncoderSpec(str(copy)))
    assert moved.key == original.key and moved.model_id != original.model_id

    before = load_document_encoder(EncoderSpec(str(copy)), precision="fp32").encode(TITLES, TEXTS)
    net = DPRContextEncoder.from_pretrained(copy)
    with torch.no_grad():
        net.ctx_encoder.bert_model.encoder.layer[0].output.dense.weight.mul_(1.5)
    net.save_pretrained(copy)
    changed = fingerprint_of(EncoderSpec(str(copy)))
    assert changed.weights_sha256 != original.weights_sha256 and changed.key != original.key
    # The per-process cache notices the new weights too.
    after = load_document_encoder(EncoderSpec(str(copy)), precision="fp32")
    assert after.fingerprint == changed
    assert not np.allclose(after.encode(TITLES, TEXTS), before)
    assert fingerprint_of(EncoderSpec(str(copy), max_length=128)).key != changed.key


def test_encoders_are_loaded_once_per_process(tiny_dpr):
    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    assert load_document_encoder(spec, precision="fp32") is load_document_encoder(spec, precision="fp32")
    assert load_question_encoder(str(tiny_dpr.question_dir)) is load_question_encoder(str(tiny_dpr.question_dir))


def test_bf16_stays_within_tolerance_of_fp32(tiny_dpr, minilm_dir):
    # Asked for explicitly: `auto` may rightly prefer fp32 where bf16 is slower (see the tests below).
    for spec in (EncoderSpec(str(tiny_dpr.ctx_dir)), EncoderSpec(str(minilm_dir), kind="mean")):
        auto = load_document_encoder(spec, precision="bf16")
        assert auto.precision.startswith("bf16") and auto.precision_cosine >= MIN_PRECISION_COSINE
        exact = load_document_encoder(spec, precision="fp32")
        assert exact.precision == "fp32"
        low, ref = auto.encode(TITLES, TEXTS), exact.encode(TITLES, TEXTS)
        cosine = (low * ref).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(ref, axis=1))
        assert cosine.mean() >= MIN_PRECISION_COSINE
        assert not np.array_equal(low, ref)  # bf16 really ran: close, not identical


def test_pairing(tiny_dpr):
    assert paired_question_encoder(str(tiny_dpr.ctx_dir), "dpr") == str(tiny_dpr.question_dir)
    assert (paired_question_encoder("facebook/dpr-ctx_encoder-multiset-base", "dpr")
            == "facebook/dpr-question_encoder-multiset-base")
    with pytest.raises(RagindexError, match="cannot tell which question encoder"):
        paired_question_encoder(str(tiny_dpr.question_dir), "dpr")


def _save_bart(directory):
    from transformers import BartConfig, BartModel

    config = BartConfig(vocab_size=120, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    BartModel(config).save_pretrained(directory)
    return directory


def test_unsupported_models_are_refused_with_one_line(tiny_dpr, minilm_dir, tmp_path):
    bart = str(_save_bart(tmp_path / "bart"))
    cases = [
        (EncoderSpec(str(tmp_path / "missing")), "encoder model not found"),
        (EncoderSpec(bart), "is a 'bart' model, not a DPR encoder"),
        (EncoderSpec(bart, kind="mean"), "encoder-decoder"),
        (EncoderSpec(str(minilm_dir)), "is a 'bert' model, not a DPR encoder"),
        (EncoderSpec(str(tiny_dpr.ctx_dir), kind="mean"), "use --encoder-kind dpr"),
        (EncoderSpec(str(tiny_dpr.question_dir)), "not a DPRContextEncoder"),
        (EncoderSpec(str(tmp_path)), "no config.json"),
    ]
    for spec, message in cases:
        with pytest.raises(RagindexError, match=message) as exc:
            load_document_encoder(spec)
        assert "\n" not in str(exc.value)
    (tmp_path / "gpt").mkdir()
    gpt = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(gpt))
    with pytest.raises(RagindexError, match="is a decoder"):
        fingerprint_of(EncoderSpec(str(tmp_path / "gpt"), kind="mean"))
    with pytest.raises(RagindexError, match="not a DPRQuestionEncoder"):
        load_question_encoder(str(tiny_dpr.ctx_dir))


def test_a_question_encoder_renamed_as_a_context_encoder_is_refused(tiny_dpr, tmp_path):
    # Same config class, wrong weights: loading would silently give random vectors.
    fake = tmp_path / "fake"
    shutil.copytree(tiny_dpr.question_dir, fake)
    config = json.loads((fake / "config.json").read_text())
    config["architectures"] = ["DPRContextEncoder"]
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(RagindexError, match="weights missing"):
        load_document_encoder(EncoderSpec(str(fake)))


def test_bad_runtime_options(tiny_dpr):
    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    with pytest.raises(RagindexError, match="unsupported precision"):
        load_document_encoder(spec, precision="int3")
    with pytest.raises(RagindexError, match="unknown device"):
        load_document_encoder(spec, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(RagindexError, match="no CUDA GPU"):
            load_document_encoder(spec, device="cuda")
    with pytest.raises(RagindexError, match="titles but"):
        load_document_encoder(spec).encode(["a"], [])


def test_save_helper_builds_projected_dpr(tmp_path):
    path = save_tiny_dpr_encoder(tmp_path / "p", "ctx", seed=1, projection_dim=8)
    encoder = load_document_encoder(EncoderSpec(str(path)), precision="fp32")
    assert encoder.dim == 8 and encoder.encode(["a"], ["b"]).shape == (1, 8)


def test_length_batches_cover_every_row_once_with_bounded_padding():
    from rag_model.batching import token_budget_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 257, size=500)
    batches = token_budget_batches(lengths, max_rows=64, max_tokens=1 << 30)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    assert max(len(b) for b in batches) == 64
    for b in batches:
        width = lengths[b[0]]
        assert width == lengths[b].max() and (width - lengths[b]).max() <= 0.125 * width
    # Longest first: the first batch holds the longest rows.
    assert lengths[batches[0][0]] == lengths.max()


def test_batches_are_cut_by_token_budget():
    from rag_model.batching import token_budget_batches

    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(100, 257, size=300), np.full(200, 10)])
    batches = token_budget_batches(lengths, max_rows=10_000, max_tokens=2048)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    padded = [len(b) * int(lengths[b[0]]) for b in batches]
    assert max(padded) <= 2048
    # Short rows pack many to a batch, long rows few: rows per batch follow the token budget.
    assert len(batches[0]) == 2048 // lengths.max() and len(batches[-1]) == 200
    assert token_budget_batches(np.array([3000, 10]), max_rows=8, max_tokens=2048)[0].tolist() == [0]


def test_prefetch_yields_in_order_and_raises_the_producers_error():
    from rag_model.batching import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("tokenizer broke")

    got = []
    with pytest.raises(ValueError, match="tokenizer broke"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]


def test_encoding_overlaps_tokenizing_in_another_thread(dpr):
    import threading

    seen = set()
    tokenize = dpr._tokenize

    def spy(first, second):
        seen.add(threading.current_thread().name)
        return tokenize(first, second)

    dpr._tokenize = spy
    try:
        dpr.encode(TITLES, TEXTS)
    finally:
        del dpr._tokenize
    assert seen == {"encoder-prefetch"}


def test_threads_default_to_the_physical_cores():
    import os

    from rag_model.batching import default_threads, physical_cores

    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert default_threads(64) == cores and default_threads(1) == 1  # never above what the env set


# -- precision: measured speed and accuracy --------------------------------------------------------


def _fake_timer(seconds: dict[str, float], perturb: str = ""):
    """Runs the real probe, reports the given seconds; `perturb` candidates get bent vectors."""
    calls = []

    def timer(name, run):
        calls.append(name)
        vectors = run()
        if name.startswith(perturb) and perturb:
            vectors = vectors + np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
        return vectors, seconds[name]

    return timer, calls


def test_auto_keeps_fp32_when_the_reduced_precision_is_slower(tiny_dpr):
    # This CPU's case (and the Xeon's): bf16 emulated, about 4x slower than fp32.
    timer, calls = _fake_timer({"fp32": 1.0, "fp32-packed": 1.3, "bf16": 4.0, "bf16-autocast": 3.9, "int8": 1.6})
    encoder = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer)
    assert calls == ["fp32", "fp32-packed", "bf16", "bf16-autocast", "int8"]
    assert encoder.precision == "fp32" and encoder.net.dtype == torch.float32 and encoder._autocast is None
    choice = encoder.precision_choice
    assert choice.chosen == "fp32" and choice.cosine == 1.0
    assert choice.passages_per_s == {"fp32": 8.0, "fp32-packed": pytest.approx(8 / 1.3, abs=1e-3), "bf16": 2.0,
                                     "bf16-autocast": pytest.approx(8 / 3.9, abs=1e-3),
                                     "int8": 5.0}
    assert min(choice.cosines.values()) >= MIN_PRECISION_COSINE  # refused for speed, not accuracy
    assert type(encoder.net.ctx_encoder.bert_model.encoder.layer[0].output.dense) is torch.nn.Linear
    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 0.97, "bf16": 0.97, "bf16-autocast": 1.2,
                            "int8": 0.98})  # within timing noise
    assert load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer).precision == "fp32"


def test_auto_takes_the_faster_reduced_precision_within_tolerance(tiny_dpr):
    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 0.6, "bf16": 0.4, "bf16-autocast": 0.5, "int8": 0.45})
    encoder = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer)
    assert encoder.precision == "bf16" and encoder.net.dtype == torch.bfloat16
    assert encoder.precision_choice.passages_per_s["bf16"] == 20.0
    exact = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="fp32")
    low, ref = encoder.encode(TITLES, TEXTS), exact.encode(TITLES, TEXTS)
    assert not np.array_equal(low, ref)  # the chosen variant is what really runs

    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 0.8, "bf16": 0.6, "bf16-autocast": 0.5, "int8": 0.7})
    encoder = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer)
    assert encoder.precision == "bf16-autocast" and encoder._autocast == torch.bfloat16


def test_auto_takes_int8_when_it_is_the_fastest_within_tolerance(tiny_dpr):
    # A CPU with VNNI but emulated bf16 (the Xeon): int8 Linear layers beat both.
    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 0.6, "bf16": 4.0, "bf16-autocast": 3.9, "int8": 0.4})
    encoder = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer)
    assert encoder.precision == "int8" and encoder._autocast is None
    assert encoder.precision_choice.cosines["int8"] >= MIN_PRECISION_COSINE
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    modules = list(encoder.net.modules())  # what really runs: no fp32 Linear left
    assert any(isinstance(m, DynamicInt8Linear) for m in modules)
    assert not any(type(m) is torch.nn.Linear for m in modules)
    exact = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="fp32")
    low, ref = encoder.encode(TITLES, TEXTS), exact.encode(TITLES, TEXTS)
    assert not np.array_equal(low, ref)
    assert np.mean((low * ref).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(ref, axis=1)) > 0.99
    # The fp32 encoder it was derived from is untouched (the variant is a quantized copy).
    assert not any(isinstance(m, DynamicInt8Linear) for m in exact.net.modules())
    # Asked for explicitly, int8 is what runs, however it compares with fp32.
    timer, _ = _fake_timer({"fp32": 1.0, "int8": 3.0})
    assert load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="int8",
                                 timer=timer).precision == "int8"
    timer, _ = _fake_timer({"fp32": 1.0, "int8": 0.2}, perturb="int8")
    assert load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="int8",
                                 timer=timer).precision == "fp32"


def test_auto_takes_packed_fp32_where_no_reduced_precision_is_kept(tiny_dpr):
    # The Xeon with a trained encoder: bf16 emulated (slow), int8 outside tolerance; fp32 with
    # pre-packed weights is the same arithmetic, faster.
    from rag_model.packed_linear import PackedLinear

    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 0.55, "bf16": 4.0, "bf16-autocast": 3.9, "int8": 0.4},
                           perturb="int8")
    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    encoder = load_document_encoder(spec, precision="auto", timer=timer)
    assert encoder.precision == "fp32-packed" and encoder._autocast is None
    assert encoder.precision_choice.cosines["int8"] < MIN_PRECISION_COSINE  # refused: the packed fp32 won on speed
    exact = load_document_encoder(spec, precision="fp32")
    linears = sum(type(m) is torch.nn.Linear for m in exact.net.modules())
    assert linears > 0 and not any(isinstance(m, PackedLinear) for m in exact.net.modules())
    modules = list(encoder.net.modules())  # what really runs: every Linear packed, none left eager
    assert sum(isinstance(m, PackedLinear) for m in modules) == linears
    assert not any(type(m) is torch.nn.Linear for m in modules)
    titles = TITLES * 4
    texts = [" ".join(["word"] * (i * 11 % 70 + 1)) for i in range(len(titles))]
    np.testing.assert_allclose(encoder.encode(titles, texts, batch_size=5), exact.encode(titles, texts, batch_size=5),
                               atol=1e-5)


def test_packing_copies_only_the_small_weights_and_leaves_the_original_untouched():
    from rag_model.packed_linear import PackedLinear, pack_linears, packed_linear_available

    assert packed_linear_available()  # this torch (2.13 CPU) has oneDNN
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.GELU(),
                              torch.nn.Linear(16, 4, bias=False)).eval()
    packed = pack_linears(net)
    assert [type(m) for m in packed] == [torch.nn.Embedding, PackedLinear, torch.nn.GELU, PackedLinear]
    assert [type(m) for m in net] == [torch.nn.Embedding, torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert packed[0].weight.data_ptr() != net[0].weight.data_ptr()  # its own embedding
    assert packed[3].bias is None and packed[1].bias.data_ptr() == net[1].bias.data_ptr()  # not copied first
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.inference_mode():
        np.testing.assert_allclose(packed(ids).numpy(), net(ids).numpy(), atol=1e-5)


def test_auto_refuses_a_faster_precision_outside_tolerance(tiny_dpr, caplog):
    timer, _ = _fake_timer({"fp32": 1.0, "fp32-packed": 1.1, "bf16": 0.2, "bf16-autocast": 0.3, "int8": 2.0},
                           perturb="bf16")
    with caplog.at_level(logging.INFO, logger="rag_model.precision"):
        encoder = load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="auto", timer=timer)
    assert encoder.precision == "fp32"
    assert max(v for k, v in encoder.precision_choice.cosines.items() if k.startswith("bf16")) < MIN_PRECISION_COSINE
    refusals = [r for r in caplog.records if "too far from fp32" in r.getMessage()]
    assert refusals and all(r.levelno == logging.INFO for r in refusals)  # auto's normal work, not a warning
    # Asked for bf16 explicitly: honoured when within tolerance even if slower, refused (warned) when not.
    timer, _ = _fake_timer({"fp32": 1.0, "bf16": 4.0, "bf16-autocast": 3.0})
    assert load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="bf16",
                                 timer=timer).precision == "bf16-autocast"
    timer, _ = _fake_timer({"fp32": 1.0, "bf16": 0.2, "bf16-autocast": 0.3}, perturb="bf16")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_document_encoder(EncoderSpec(str(tiny_dpr.ctx_dir)), precision="bf16",
                                     timer=timer).precision == "fp32"
    assert any(r.levelno == logging.WARNING and "too far from fp32" in r.getMessage() for r in caplog.records)


def test_cuda_candidates_and_the_largest_batch_that_fits():
    from rag_model.batching import largest_fitting
    from rag_model.precision import candidates

    assert candidates("auto", "cuda") == ["fp32", "fp16", "fp16-autocast"]
    assert candidates("auto", "cuda", cuda_bf16=True)[-1] == "bf16-autocast"
    # This torch has fbgemm/x86 and oneDNN; a network about to be compiled gets its weights packed by the compiler.
    assert candidates("auto", "cpu") == ["fp32", "fp32-packed", "bf16", "bf16-autocast", "int8"]
    assert candidates("auto", "cpu", compiling=True) == ["fp32", "bf16", "bf16-autocast", "int8"]
    assert candidates("bf16", "cpu") == ["fp32", "bf16", "bf16-autocast"] and candidates("fp32", "cpu") == ["fp32"]
    assert candidates("fp16", "cpu") == ["fp32"] and candidates("fp32", "cuda") == ["fp32"]
    assert candidates("int8", "cuda") == ["fp32"] and candidates("int8", "cpu") == ["fp32", "int8"]
    tried = []

    def forward(tokens):  # stands in for the GPU: 20k tokens fit, more do not
        tried.append(tokens)
        if tokens > 20_000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert largest_fitting(forward, start=1 << 17, floor=256) == 16384
    assert tried == [131072, 65536, 32768, 16384]


# -- sentence-transformers conventions ------------------------------------------------------------


def test_minilm_defaults_come_from_its_sentence_transformers_config(minilm_dir, caplog):
    with caplog.at_level(logging.WARNING):
        default = fingerprint_of(EncoderSpec(str(minilm_dir), kind="mean"))
    assert (default.pooling, default.normalize, default.max_length) == ("mean", True, 256)
    assert default.key == fingerprint_of(EncoderSpec(str(minilm_dir), kind="mean", normalize=True)).key
    assert "sentence-transformers" not in caplog.text  # agreeing with the model is silent
    unit = load_document_encoder(EncoderSpec(str(minilm_dir), kind="mean"), precision="fp32").encode(TITLES, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    with caplog.at_level(logging.WARNING):
        raw = fingerprint_of(EncoderSpec(str(minilm_dir), kind="mean", normalize=False, max_length=128))
    assert (raw.normalize, raw.max_length) == (False, 128)  # the explicit flags win ...
    lines = [r.getMessage() for r in caplog.records if "sentence-transformers" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)  # ... with one line each
    assert "normalisation" in lines[0] and "max_seq_length 256" in lines[1]


def _save_st_bert(directory, pooling: str, normalize: bool, max_seq_length: int):
    """A tiny BERT saved the way sentence-transformers saves a model, declaring its conventions."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True)
    tokenizer = BertTokenizerFast(vocab_file=str(write_vocab(directory)), do_lower_case=True)
    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m.startswith(pooling) for m in ("cls_token", "mean_tokens", "max_tokens")}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return directory


def test_a_model_declaring_cls_pooling_and_no_normalisation(tmp_path, minilm_dir, caplog):
    from transformers import AutoModel, AutoTokenizer

    model = _save_st_bert(tmp_path / "st", pooling="cls", normalize=False, max_seq_length=16)
    encoder = load_document_encoder(EncoderSpec(str(model), kind="mean"), precision="fp32")
    fp = encoder.fingerprint
    assert (fp.pooling, fp.normalize, fp.max_length) == ("cls", False, 16)
    got = encoder.encode(TITLES[:2], TEXTS[:2])
    tok, net = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()
    for i in range(2):
        enc = tok(TITLES[i], TEXTS[i], return_tensors="pt", truncation=True, max_length=16)
        assert enc["input_ids"].shape[1] <= 16
        with torch.inference_mode():
            cls = net(input_ids=enc["input_ids"]).last_hidden_state[0, 0]
        np.testing.assert_allclose(got[i], cls.numpy(), atol=1e-4)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)  # not normalised
    question = load_question_encoder(str(model), kind="mean")
    assert (question.pooling, question.normalize, question.max_length) == ("cls", False, 16)
    minilm_question = load_question_encoder(str(minilm_dir), kind="mean")
    assert (minilm_question.pooling, minilm_question.normalize, minilm_question.max_length) == ("mean", True, 256)
    with caplog.at_level(logging.WARNING):
        flagged = fingerprint_of(EncoderSpec(str(model), kind="mean", normalize=True))
    assert flagged.normalize is True and flagged.key != fp.key
    assert sum("has no normalisation; --normalize overrides it" in r.getMessage() for r in caplog.records) == 1
    # DPR models are not sentence-transformers models: nothing read, the old defaults stay.
    (tmp_path / "other").mkdir()
    max_pool = _save_st_bert(tmp_path / "other" / "st", pooling="max", normalize=True, max_seq_length=32)
    assert fingerprint_of(EncoderSpec(str(max_pool), kind="mean")).pooling == "max"
    assert load_document_encoder(EncoderSpec(str(max_pool), kind="mean"), precision="fp32").encode(
        ["a"], ["b"]).shape == (1, 32)


def test_a_compiled_encoder_gives_the_eager_vectors_and_never_compiles_while_encoding(tiny_dpr):
    from torch._dynamo.utils import counters

    spec = EncoderSpec(str(tiny_dpr.ctx_dir))
    eager = load_document_encoder(spec, precision="fp32")
    compiled = load_document_encoder(spec, precision="fp32", compile=True)
    assert compiled is not eager and compiled.compile_s > 0 and eager.compile_s is None
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)
    graphs = counters["stats"]["unique_graphs"]
    titles = TITLES * 6
    texts = [" ".join(["word"] * (i * 7 % 60 + 1)) for i in range(len(titles))]  # many lengths
    for batch_size in (7, 2, 1):  # every batch shape after the compile at load, padded or not
        np.testing.assert_allclose(compiled.encode(titles, texts, batch_size=batch_size),
                                   eager.encode(titles, texts, batch_size=batch_size), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on the encoding path
