"""Scorers on tiny random models loaded from folders, scoring decoded PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agfsync_jax.schemas import Question
from data_prep.scoring.scorer import ScoringItem

CPU, F32 = torch.device("cpu"), torch.float32
SHORT_PROMPTS = ["a red cat on a table", "two dogs in the park", "a blue car near the river",
                 "an old wooden house", "a small bird in the sky", "three flowers in a vase"]
QUESTIONS = (Question("is there a cat in the image?"), Question("is the car red?"))


def _items(images, prompts=SHORT_PROMPTS, questions=QUESTIONS):
    return [ScoringItem(image=im, text=p, questions=questions) for im, p in zip(images, prompts)]


@pytest.fixture(scope="module")
def clip_scorer(scorer_models):
    from data_prep.scoring.clip_score import ClipScorer

    return ClipScorer(scorer_models["clip"], CPU, F32, batch_size=4)  # 4 < 6 items: two batches


def test_clip_score_matches_torchmetrics_on_short_prompts(scorer_models, candidate_images, clip_scorer):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = scorer_models["clip"]
    # Every image with every prompt: 36 pairs, so plenty have a positive cosine.
    pairs = [(im, p) for im in candidate_images for p in SHORT_PROMPTS]
    ours = clip_scorer.score([ScoringItem(im, p) for im, p in pairs])
    metric = CLIPScore(
        model_name_or_path=lambda: (CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)))
    theirs = []
    for image, prompt in pairs:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 (3, H, W), as torchmetrics takes
        metric.reset()
        metric.update(pixels, prompt)
        theirs.append(float(metric.compute()))
    # torchmetrics reports max(score, 0); enough positive scores must exist for this to test anything.
    assert (ours > 1.0).sum() >= 8, ours
    np.testing.assert_allclose(np.maximum(ours, 0.0), theirs, atol=1e-4, rtol=0)
    assert ours.std() > 1.0  # the scores depend on image and text


def test_clip_long_prompt_keeps_end_of_text_token(scorer_models, candidate_images, clip_scorer):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(scorer_models["clip"])
    tokenizer = processor.tokenizer
    long_prompt = " ".join(["a red cat and a blue dog on a wooden table"] * 12)
    full = tokenizer(long_prompt)["input_ids"]
    assert len(full) > 77
    enc = clip_scorer.embedder.tokenize([long_prompt, "a cat"])
    assert enc["input_ids"].shape[1] == 77
    assert int(enc["input_ids"][0, -1]) == tokenizer.eos_token_id
    # Our long-prompt score is the score of its first 75 tokens between BOS and EOS.
    manual_ids = torch.tensor([full[:76] + [tokenizer.eos_token_id]])
    model = clip_scorer.embedder.model
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.get_text_features(input_ids=manual_ids), dim=-1)
    image = clip_scorer.embedder.image_embeddings(candidate_images[:1])
    expected = 100 * float((text * image).sum())
    got = clip_scorer.score([ScoringItem(candidate_images[0], long_prompt)])[0]
    assert got == pytest.approx(expected, abs=1e-4)
    # torchmetrics' slicing drops EOS, so CLIP pools elsewhere and the embedding differs.
    with torch.no_grad():
        sliced = model.get_text_features(input_ids=torch.tensor([full[:77]]))
    assert not torch.allclose(torch.nn.functional.normalize(sliced, dim=-1), text, atol=1e-3)


def test_aesthetic_head_matches_hand_computation(scorer_models, candidate_images):
    from transformers import CLIPModel, CLIPProcessor

    from data_prep.scoring.aesthetic import AestheticScorer

    scorer = AestheticScorer(scorer_models["aesthetic_clip"], scorer_models["aesthetic_head"], CPU, F32, batch_size=4)
    got = scorer.score(_items(candidate_images))
    model = CLIPModel.from_pretrained(scorer_models["aesthetic_clip"])
    processor = CLIPProcessor.from_pretrained(scorer_models["aesthetic_clip"])
    with torch.no_grad():
        emb = model.get_image_features(**processor(images=candidate_images, return_tensors="pt")).double()
    x = (emb / emb.norm(dim=-1, keepdim=True)).numpy()
    state = torch.load(scorer_models["aesthetic_head"], weights_only=True)
    for i in (0, 2, 4, 6, 7):  # the LAION layout: Linear layers between dropouts, no activations
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    np.testing.assert_allclose(got, 100.0 * (x[:, 0] - 1.0) / 9.0, rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0
    # The tiny head rates mid-scale like a trained one, so its scores are on 0-100.
    assert np.all((got > 0) & (got < 100)), got


def test_aesthetic_rating_scale_maps_1_to_10_onto_0_to_100():
    from data_prep.scoring import aesthetic

    np.testing.assert_allclose(aesthetic.rating_to_0_100([1.0, 5.5, 10.0, 4.6]), [0.0, 50.0, 100.0, 40.0],
                               atol=1e-12)
    # Linear and unclipped outside the nominal range: no ties at the ends of the scale.
    np.testing.assert_allclose(aesthetic.rating_to_0_100([0.1, 10.9]), [-10.0, 110.0], atol=1e-12)
    assert aesthetic.rating_to_0_100(7.3) == pytest.approx(70.0)
    doc = " ".join(aesthetic.__doc__.split())
    assert "stands in" in doc.lower() or "stand-in" in doc.lower()
    assert "VILA" in doc and "no PyTorch port" in doc
    assert "100 * (rating - 1) / (10 - 1)" in doc and "1 -> 0" in doc and "10 -> 100" in doc


def test_aesthetic_head_file_errors_name_the_file(tmp_path):
    from data_prep.scoring.aesthetic import AestheticHead

    bad = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4), "extra": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"head\.pth.*unexpected key 'extra'"):
        AestheticHead.from_file(bad)
    torch.save({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4),
                "layers.2.weight": torch.zeros(1, 5), "layers.2.bias": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="layers.2 takes 5 inputs"):
        AestheticHead.from_file(bad)


def test_pickscore_uses_the_model_logit_scale(scorer_models, candidate_images):
    from data_prep.scoring.clip_score import ClipScorer
    from data_prep.scoring.pickscore import PickScoreScorer

    pick = PickScoreScorer(scorer_models["pickscore"], CPU, F32, batch_size=4)
    assert pick.scale == pytest.approx(50.0, rel=1e-5)
    items = _items(candidate_images)
    clip_same_model = ClipScorer(scorer_models["pickscore"], CPU, F32).score(items)
    np.testing.assert_allclose(pick.score(items), 0.5 * clip_same_model, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["opt", "t5"])
def vqa_folder(request, scorer_models):
    return request.param, scorer_models[f"blip2_{request.param}"]


def test_vqa_likelihood_is_a_probability_that_depends_on_the_image(vqa_folder, candidate_images):
    from data_prep.scoring.vqa import VqaScorer

    lm, path = vqa_folder
    scorer = VqaScorer(path, "likelihood", CPU, F32, batch_size=4)
    assert scorer.version.startswith(f"blip2-{lm}:") and scorer.version.endswith(":likelihood")
    questions = ["is there a cat in the image?", "is the car red?", "is there a bird?",
                 "are there two dogs in the park near the river?", "is it blue?", "is the house old?"]
    p = scorer.yes_probabilities(candidate_images, questions)
    assert p.shape == (6,) and np.all((p >= 0) & (p <= 1))
    same_question = scorer.yes_probabilities(candidate_images, [questions[0]] * 6)
    assert np.ptp(same_question) > 1e-7, same_question  # a different image moves P(yes)
    # Batched (padded, mixed lengths) equals one at a time.
    single = np.array([scorer.yes_probabilities([im], [q])[0] for im, q in zip(candidate_images, questions)])
    np.testing.assert_allclose(p, single, atol=2e-5)
    # score = 100 x mean over questions of P(expected answer); a "no" question counts 1 - P(yes).
    qs = (Question("is there a cat in the image?", element_type="animal/human"),
          Question("is the car red?", answer="no", element_type="color"))
    got, answers = scorer.score_with_answers(_items(candidate_images[:2], questions=qs))
    np.testing.assert_array_equal(scorer.score(_items(candidate_images[:2], questions=qs)), got)
    assert len(answers) == 2
    for k in range(2):
        py = scorer.yes_probabilities([candidate_images[k]] * 2, [q.question for q in qs])
        assert got[k] == pytest.approx(100 * (py[0] + (1 - py[1])) / 2, abs=1e-3)
        # Per question: the question's element type, P(yes), the answer it implies, its credit.
        assert [(a.question, a.element_type, a.expected) for a in answers[k]] == [
            ("is there a cat in the image?", "animal/human", "yes"), ("is the car red?", "color", "no")]
        for a, p_yes in zip(answers[k], py):
            assert a.p_yes == pytest.approx(p_yes, abs=2e-5) and 0.0 <= a.p_yes <= 1.0
            assert a.is_yes == (a.p_yes > 0.5) and a.answer == ("yes" if a.is_yes else "no")
            assert a.correct == (a.answer == a.expected)
            assert a.credit == pytest.approx(a.p_yes if a.expected == "yes" else 1.0 - a.p_yes)
        assert got[k] == pytest.approx(100 * np.mean([a.credit for a in answers[k]]), abs=1e-12)


def test_vqa_generate_mode_runs_on_the_model(vqa_folder, candidate_images):
    from data_prep.scoring.vqa import VqaScorer

    _, path = vqa_folder
    scorer = VqaScorer(path, "generate", CPU, F32, batch_size=4, max_new_tokens=4)
    assert scorer.version.endswith(":generate")
    answers = scorer.generate_answers(candidate_images[:3], ["is there a cat?", "is the car red?", "is it big?"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert not any(a.startswith("Question:") for a in answers)  # the prompt is stripped
    scores = scorer.score(_items(candidate_images[:3]))
    assert set(np.round(scores, 6)) <= {0.0, 50.0, 100.0}  # two questions: a fraction of 2


def test_generate_mode_parses_answers_strictly(vqa_folder, candidate_images, monkeypatch):
    from data_prep.scoring.vqa import VqaScorer

    _, path = vqa_folder
    scorer = VqaScorer(path, "generate", CPU, F32)
    canned = ["Yes, there is.", "yesterday", "no", "nothing", "b", "yes"]
    monkeypatch.setattr(scorer, "generate_answers", lambda images, questions: canned[:len(questions)])
    qs = (Question("q1?", element_type="object"), Question("q2?", element_type="counting"))
    # Pairs of answers per item: (Yes, yesterday) (no, nothing) (b, yes) -> 1/2, 0/2, 1/2.
    np.testing.assert_allclose(scorer.score(_items(candidate_images[:3], questions=qs)), [50.0, 0.0, 50.0])
    # Every answer is recorded as given, with the strict parse's verdict and the question's type.
    _, answers = scorer.score_with_answers(_items(candidate_images[:3], questions=qs))
    flat = [a for item in answers for a in item]
    assert [a.answer for a in flat] == canned
    assert [a.is_yes for a in flat] == [True, False, False, False, False, True]
    assert [a.correct for a in flat] == [True, False, False, False, False, True]
    assert [a.credit for a in flat] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert all(a.p_yes is None for a in flat)
    assert [a.element_type for a in flat] == ["object", "counting"] * 3
    # A "no" question is correct when the answer parses to no.
    no_q = (Question("is it blue?", answer="no", element_type="color"),)
    monkeypatch.setattr(scorer, "generate_answers", lambda images, questions: ["No."])
    (only,), = scorer.score_with_answers(_items(candidate_images[:1], questions=no_q))[1]
    assert (only.is_yes, only.correct, only.credit, only.expected) == (False, True, 1.0, "no")


def test_vqa_answers_round_trip_through_score_rows():
    import json

    from agfsync_jax.schemas import SchemaError, ScoreRow, VqaAnswer
    from data_prep.scoring.vqa import generated_answer, likelihood_answer, score_from_answers

    answers = (likelihood_answer(Question("is there a cat?", element="cat", element_type="animal/human"), 0.8),
               likelihood_answer(Question("is it wooden?", answer="no", element_type="material"), 0.3),
               generated_answer(Question("is it red?", element_type="color"), "yes it is"))
    assert [(a.answer, a.is_yes, a.correct) for a in answers] == [("yes", True, True), ("no", False, True),
                                                                 ("yes it is", True, True)]
    assert [a.credit for a in answers] == pytest.approx([0.8, 0.7, 1.0])
    assert score_from_answers(answers) == pytest.approx(100 * 2.5 / 3)
    row = ScoreRow(prompt_id="p", candidate=0, scores={"vqa": score_from_answers(answers)}, total=1.0,
                   scorers={"vqa": "blip2-t5:x:likelihood"}, vqa_answers=answers)
    back = ScoreRow.from_dict(json.loads(json.dumps(row.to_dict())))
    assert back == row and isinstance(back.vqa_answers[0], VqaAnswer)
    bad = row.to_dict()
    bad["vqa_answers"][1]["element_type"] = "colour"
    with pytest.raises(SchemaError, match=r"vqa_answers\[1\]: field 'element_type' is 'colour'"):
        ScoreRow.from_dict(bad)
    bad = row.to_dict()
    bad["vqa_answers"][0]["p_yes"] = 1.5
    with pytest.raises(SchemaError, match=r"vqa_answers\[0\]: field 'p_yes' must be in \[0, 1\]"):
        ScoreRow.from_dict(bad)
    with pytest.raises(SchemaError, match="expected a JSON object"):
        ScoreRow.from_dict({**row.to_dict(), "vqa_answers": [0.5]})


def test_parse_yes_no_is_not_a_substring_match():
    from data_prep.scoring.vqa import answer_is_correct, parse_yes_no

    assert parse_yes_no("yes") == "yes"
    assert parse_yes_no(" Yes. It is red") == "yes"
    assert parse_yes_no("NO!") == "no"
    for text in ("", "nothing", "yesterday", "b", "not really", "I think yes", "none", "eyes"):
        assert parse_yes_no(text) is None, text
    assert answer_is_correct("no", Question("is it red?", answer="no"))
    assert not answer_is_correct("know", Question("is it red?", answer="no"))
    mc = Question("what color is it?", answer="red", choices=("red", "blue"))
    assert answer_is_correct("Red.", mc) and not answer_is_correct("reddish", mc)


MC = Question("how many kites are there?", answer="2", choices=("1", "2", "3", "4"), element_type="counting")


def _hf_choice_log_likelihood(scorer, image, question, choice) -> float:
    """The oracle: transformers' own language-model loss over the choice's tokens, x their count."""
    ids = scorer._choice_ids(choice)
    enc = scorer._inputs([image], [question])
    target = torch.tensor([ids])
    with torch.no_grad():
        if scorer.decoder_only:
            input_ids = torch.cat([enc["input_ids"], target], dim=1)
            labels = torch.full_like(input_ids, -100)
            labels[:, -len(ids):] = target
            loss = scorer.model(pixel_values=enc["pixel_values"], input_ids=input_ids,
                                attention_mask=torch.ones_like(input_ids), labels=labels).loss
        else:
            loss = scorer.model(**enc, labels=target).loss
    return -float(loss) * len(ids)


def test_likelihood_mode_scores_multiple_choice_by_choice_likelihood(vqa_folder, candidate_images):
    from data_prep.scoring.vqa import VqaScorer, likelihood_answer

    scorer = VqaScorer(vqa_folder[1], "likelihood", CPU, F32, batch_size=3)  # 3: batches cut questions
    other = Question("what color is the car?", answer="blue", choices=("red", "blue", "green"), element_type="color")
    images = candidate_images[:2]
    logps = scorer.choice_log_likelihoods(images, [MC.question, other.question], [MC.choices, other.choices])
    assert [lp.shape for lp in logps] == [(4,), (3,)]
    for image, q, lp in zip(images, (MC, other), logps):
        oracle = [_hf_choice_log_likelihood(scorer, image, q.question, c) for c in q.choices]
        np.testing.assert_allclose(lp, oracle, atol=1e-4)
    again = scorer.choice_log_likelihoods(images[::-1], [MC.question] * 2, [MC.choices] * 2)
    assert np.abs(again[0] - again[1]).max() > 1e-7  # the image matters

    yes_no = Question("is there a kite?", element_type="object")
    scores, answers = scorer.score_with_answers(_items(images, questions=(MC, yes_no)))
    for k, image in enumerate(images):
        mc, yn = answers[k]
        lp = scorer.choice_log_likelihoods([image], [MC.question], [MC.choices])[0]
        p = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
        assert mc.answer == MC.choices[int(np.argmax(lp))] and mc.correct == (mc.answer == "2")
        assert mc.credit == pytest.approx(p[1], abs=1e-6) and mc.p_yes is None and mc.element_type == "counting"
        assert yn == likelihood_answer(yes_no, yn.p_yes)  # yes/no questions: unchanged
        assert scores[k] == pytest.approx(100 * (mc.credit + yn.credit) / 2, abs=1e-9)


def test_generate_mode_answers_multiple_choice_on_the_model(vqa_folder, candidate_images):
    from data_prep.scoring.vqa import VqaScorer, answer_is_correct

    scorer = VqaScorer(vqa_folder[1], "generate", CPU, F32, max_new_tokens=4)
    (answer,), = scorer.score_with_answers(_items(candidate_images[:1], questions=(MC,)))[1]
    assert answer.correct == answer_is_correct(answer.answer, MC) and answer.credit == float(answer.correct)


def test_tifa_question_file_scores_in_both_modes(vqa_folder, candidate_images, tmp_path):
    """TIFA's own sample question file when it is here, else rows in its schema written here."""
    import json
    from pathlib import Path

    from data_prep.prompts.benchmarks import load_benchmark
    from data_prep.scoring.vqa import VqaScorer

    real = Path("/work/shared/benchmarks/sample_question_answers.json")
    path = real if real.is_file() else tmp_path / "qa.json"
    if not real.is_file():
        path.write_text(json.dumps([
            {"id": "coco_1", "caption": "Two kites above a hill.", "question": "are there kites?",
             "choices": ["yes", "no"], "answer": "yes", "element_type": "object", "element": "kites"},
            {"id": "coco_1", "caption": "Two kites above a hill.", "question": "how many kites are there?",
             "choices": ["1", "2", "3", "4"], "answer": "2", "element_type": "counting", "element": "two"}]))
    record = load_benchmark("tifa_questions", path)[0]
    assert any(not q.is_yes_no for q in record.questions) or not real.is_file()
    for mode in ("likelihood", "generate"):
        scorer = VqaScorer(vqa_folder[1], mode, CPU, F32, max_new_tokens=4)
        scores, (answers,) = scorer.score_with_answers(_items(candidate_images[:1], [record.prompt],
                                                              questions=record.questions))
        assert len(answers) == len(record.questions) and 0.0 <= scores[0] <= 100.0
        if mode == "likelihood":
            assert all(a.answer in q.choices for a, q in zip(answers, record.questions))


def test_device_selection():
    from data_prep.scoring.device import select_device

    assert select_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="expected one of"):
        select_device("tpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_scores_match_cpu(scorer_models, candidate_images):
    from data_prep.scoring.aesthetic import AestheticScorer
    from data_prep.scoring.clip_score import ClipScorer
    from data_prep.scoring.device import select_device
    from data_prep.scoring.vqa import VqaScorer

    device, dtype = select_device("auto")
    assert dtype == torch.float16
    items = _items(candidate_images)
    builders = {
        "clip": lambda d, t: ClipScorer(scorer_models["clip"], d, t),
        "aesthetic": lambda d, t: AestheticScorer(scorer_models["aesthetic_clip"],
                                                  scorer_models["aesthetic_head"], d, t),
        "vqa_t5": lambda d, t: VqaScorer(scorer_models["blip2_t5"], "likelihood", d, t),
        "vqa_opt": lambda d, t: VqaScorer(scorer_models["blip2_opt"], "likelihood", d, t),
    }
    for name, build in builders.items():
        gpu, cpu = build(device, dtype).score(items), build(CPU, F32).score(items)
        np.testing.assert_allclose(gpu, cpu, atol=0.5, err_msg=name)  # fp16 on a 0-100 scale
