"""Text encoders (docs/method.md §2) and the text conditioner: the offline MiniLM against sentence-transformers,
tiny BERT / T5 / CLIP models built from configs and saved locally, the prompt cache, padding."""

import pytest
import torch

from ldmkit.text import TextConditioner
from ldmkit.text_encoder import TextEncoder, minilm_path

transformers = pytest.importorskip("transformers")

PROMPTS = ["a blue square in the bottom right", "", "a red circle in the top left", "a blue square in the bottom right"]


def _bert_tokenizer(path):
    words = "a blue red green square circle triangle in the top bottom left right center middle".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tok.save_pretrained(str(path))
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> local directory of a tiny random encoder with a word-level tokenizer."""
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    n = _bert_tokenizer(bert)
    transformers.BertModel(transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    out["bert"] = bert
    t5 = root / "t5"
    t5.mkdir()
    n = _bert_tokenizer(t5)
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=n, d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                                      num_heads=3)).save_pretrained(t5)
    out["t5"] = t5
    clip = root / "clip"
    clip.mkdir()
    n = _bert_tokenizer(clip)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           eos_token_id=3)).save_pretrained(clip)
    out["clip"] = clip
    return out


def test_minilm_matches_sentence_transformers():
    """The offline default equals what sentence-transformers computes for all-MiniLM-L6-v2: the pooled
    vector is SentenceTransformer.encode (mean pooling + normalisation), the tokens its token embeddings."""
    st = pytest.importorskip("sentence_transformers")
    enc = TextEncoder("minilm", max_length=32)
    out = enc.encode(PROMPTS[:3])
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu")
    pooled = ref.encode(PROMPTS[:3], convert_to_tensor=True)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    tokens = ref.encode(PROMPTS[:1], output_value="token_embeddings")[0]
    assert out.n_valid.tolist() == [9, 2, 9] and enc.width == 384  # [CLS] 7 words [SEP]; "" -> [CLS] [SEP]
    torch.testing.assert_close(out.tokens[0, :9], tokens, atol=1e-5, rtol=1e-5)
    assert torch.all(out.tokens[1, 2:] == 0)


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_tiny_encoders_from_local_directories(tiny_models, kind):
    path = tiny_models[kind]
    enc = TextEncoder(str(path), max_length=6)
    expected_class = {"bert": "BertModel", "t5": "T5EncoderModel", "clip": "CLIPTextModel"}[kind]
    assert type(enc.model).__name__ == expected_class
    out = enc.encode(PROMPTS)
    # independent reference: the transformers model run directly on each prompt alone
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = getattr(transformers, expected_class).from_pretrained(str(path)).eval()
    for i, prompt in enumerate(PROMPTS):
        ids = tok([prompt], truncation=True, max_length=6, return_tensors="pt")
        with torch.no_grad():
            ref = model(**ids)
        n = ids["input_ids"].shape[1]
        assert out.n_valid[i] == n <= 6
        torch.testing.assert_close(out.tokens[i, :n], ref.last_hidden_state[0], atol=1e-5, rtol=1e-5)
        pooled = ref.pooler_output[0] if kind == "clip" else ref.last_hidden_state[0].mean(0)
        torch.testing.assert_close(out.pooled[i], pooled, atol=1e-5, rtol=1e-5)
    assert enc.width == (24 if kind == "t5" else 32)


def test_cache_encodes_each_prompt_once_and_round_trips(tiny_models, tmp_path):
    enc = TextEncoder(str(tiny_models["bert"]), max_length=8)
    calls = []
    run = enc._run
    enc._run = lambda prompts: calls.append(list(prompts)) or run(prompts)
    first = enc.encode(PROMPTS)
    again = enc.encode(PROMPTS[::-1])
    assert calls == [PROMPTS[:3]] and enc.cached == 3  # the repeated prompt is encoded once, then nothing
    torch.testing.assert_close(again.pooled, first.pooled.flip(0))
    path = enc.save_cache(tmp_path / "cache.safetensors")
    fresh = TextEncoder(str(tiny_models["bert"]), max_length=8)
    assert fresh.load_cache(path) == 3
    fresh._run = lambda prompts: pytest.fail(f"cached prompts were encoded again: {prompts}")
    loaded = fresh.encode(PROMPTS)
    assert torch.equal(loaded.tokens, first.tokens) and torch.equal(loaded.pooled, first.pooled)
    other = TextEncoder(str(tiny_models["bert"]), max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        other.load_cache(path)


def test_missing_encoder_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError, OSError), match="cond.text.encoder|not-there"):
        TextEncoder(str(tmp_path / "not-there"))


def test_conditioner_pads_to_length_with_noise_only_in_training(tiny_models):
    enc = TextEncoder(str(tiny_models["bert"]), max_length=8)
    text = TextConditioner(enc, length=10, mode="noisy_replicate", sigma=0.1)
    g = torch.Generator().manual_seed(0)
    train = text(PROMPTS, training=True, generator=g)
    infer = text(PROMPTS, training=False)
    assert train["text"].shape == (4, 10, 32) and train["text_mask"] is None and train["text_pooled"] is None
    raw = enc.encode(PROMPTS)
    for i in range(4):
        n = int(raw.n_valid[i])
        idx = torch.arange(10) % n
        torch.testing.assert_close(infer["text"][i], raw.tokens[i, idx])  # replicas, no noise
        torch.testing.assert_close(train["text"][i, :n], raw.tokens[i, :n])  # real tokens untouched
        assert not torch.allclose(train["text"][i, n:], infer["text"][i, n:])  # replicas noised
    zero = TextConditioner(enc, length=10, mode="zero", pooled=True)(PROMPTS)
    assert zero["text_mask"].sum(1).tolist() == raw.n_valid.tolist() and zero["text_pooled"].shape == (4, 32)
    assert TextConditioner(enc, 10, "noisy_replicate", noise_at_inference=True).needs_noise(training=False)
    with pytest.raises(ValueError, match="padding mode"):
        TextConditioner(enc, 10, mode="wrap")
