import random

import numpy as np
import pytest

from data_prep.prompts import dedup
from data_prep.prompts.dedup import NearDuplicateFilter, lexical_similarity


def _jaccard(a, b):
    ga, gb = dedup.trigrams(a), dedup.trigrams(b)
    return len(ga & gb) / len(ga | gb)


def _naive_keep(texts, threshold):
    kept = []
    for i, t in enumerate(texts):
        if all(_jaccard(t, texts[j]) < threshold for j in kept):
            kept.append(i)
    return kept


def test_lexical_similarity_is_trigram_jaccard():
    a, b = "Is the dog brown?", "Is the dog black?"
    assert lexical_similarity(a, b) == pytest.approx(_jaccard(a, b))
    assert 0.3 < lexical_similarity(a, b) < 0.8
    assert lexical_similarity(a, a.upper()) == 1.0


def test_lexical_drops_near_duplicates_in_order():
    texts = ["A red fox sleeping in the snow.",
             "a red fox sleeping in the snow",         # same after normalisation
             "A red fox sleeping in the snow today.",  # near duplicate
             "Two blue boats on a quiet lake.",
             "A red fox sleeping in the snow."]
    assert NearDuplicateFilter(0.8).keep(texts) == [0, 3]
    assert NearDuplicateFilter(1.0).keep(texts) == [0, 2, 3]  # only identical texts go
    assert NearDuplicateFilter(0.8).keep([]) == []


def test_block_path_matches_a_naive_implementation(monkeypatch):
    monkeypatch.setattr(dedup, "_ROW_BLOCK", 16)  # several row blocks
    rng = random.Random(0)
    words = "red blue cat dog on the table river sunset house old new".split()
    texts = [" ".join(rng.choice(words) for _ in range(5)) for _ in range(120)]
    for threshold in (0.5, 0.7):
        got = NearDuplicateFilter(threshold).keep(texts)
        assert got == _naive_keep(texts, threshold)
        assert 0 < len(got) < len(texts)
    # The small-list path agrees with the matrix path.
    monkeypatch.setattr(dedup, "_SMALL", 0)
    assert NearDuplicateFilter(0.6).keep(texts[:40]) == _naive_keep(texts[:40], 0.6)


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateFilter(0.0)


@pytest.fixture(scope="module")
def tiny_encoder_dir(tiny_tokenizer_dir, tmp_path_factory):
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "encoder"
    shutil.copytree(tiny_tokenizer_dir, out)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(out)
    return out


def test_embedding_measure_uses_model_cosine(tiny_encoder_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["a red cat on the table", "a blue dog near the river", "the sun on the sky"]
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    model = AutoModel.from_pretrained(tiny_encoder_dir).eval()
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    sims = emb @ emb.T
    s01, s02 = float(sims[0, 1]), float(sims[0, 2])
    assert abs(s01 - s02) > 1e-4
    # A threshold between the two similarities drops exactly the more similar text.
    threshold = (s01 + s02) / 2
    f = NearDuplicateFilter(threshold, embedding_model_path=str(tiny_encoder_dir))
    assert f.measure == "embedding"
    kept = f.keep(texts)
    dropped_more_similar = 1 if s01 > s02 else 2
    assert dropped_more_similar not in kept and 0 in kept
    np.testing.assert_allclose(f.embedder.embed(texts), emb, atol=1e-5)
