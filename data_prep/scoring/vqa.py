"""VQA score (TIFA; AGFSync Eq. 2) with a BLIP-2 model from a local folder.

For each candidate the model answers the prompt's questions (AGFSync's are all yes-questions;
TIFA's own are yes/no and multiple-choice); the score is 100 x the mean over questions of:

* likelihood mode (default, deterministic): yes/no questions, P(answer | image, question)
  restricted to yes/no, P(yes) / (P(yes) + P(no)) from the next-token logits after
  "Question: ... Answer:". "yes" is the total probability of its single-token spellings ("yes",
  " yes", "Yes", " Yes"); same for "no". This is a soft version of the paper's accuracy that
  does not throw away the margin. Multiple-choice questions (TIFA's protocol): the likelihood
  of each choice as the whole answer (its tokens, then the language model's end token), the
  question's credit is the expected choice's share of the choices' likelihoods, and it is
  correct when the expected choice is the most likely.
* generate mode (the paper's accuracy): greedy-decode an answer and count it correct when it
  parses to the expected answer. Parsing is strict: the first word of the lower-cased answer
  must *be* "yes" or "no" ("Yes, it is" -> yes; "nothing", "yesterday", "b" -> no answer).
  The authors' released code counted any answer as yes unless it contained "no" or "b"; we do
  not reproduce that substring rule. Multiple-choice questions match on the whole normalised
  answer.

Every question's result is kept as a schemas.VqaAnswer (question, element type, expected answer,
the answer or P(yes), whether it counts as "yes", whether it is correct, and its credit) and
written to ScoreRow.vqa_answers, so evaluation can report TIFA accuracy per element type.

transformers 4.57's BLIP-2 expects `num_query_tokens` image placeholder tokens in `input_ids`;
the processor inserts them once it knows `num_query_tokens`, which older folders do not store,
so we set it from the model config.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agfsync_jax.schemas import Question, VqaAnswer
from data_prep.scoring.scorer import Scorer, ScoringItem, batches

MODES = ("likelihood", "generate")
DEFAULT_PROMPT = "Question: {question} Answer:"
_YES_SPELLINGS = ("yes", " yes", "Yes", " Yes")
_NO_SPELLINGS = ("no", " no", "No", " No")
_WORD = re.compile(r"[a-z0-9']+")


def normalize_answer(text: str) -> str:
    """Lower-cased words joined by single spaces; punctuation dropped."""
    return " ".join(_WORD.findall(text.lower()))


def parse_yes_no(text: str) -> str | None:
    """'yes' or 'no' when the answer's first word is exactly that, else None (unparsable)."""
    words = _WORD.findall(text.lower())
    if not words or words[0] not in ("yes", "no"):
        return None
    return words[0]


def answer_is_correct(answer: str, question: Question) -> bool:
    """Strict match of a generated answer against the question's expected answer."""
    if question.is_yes_no:
        return parse_yes_no(answer) == question.answer.lower()
    return normalize_answer(answer) == normalize_answer(question.answer)


def likelihood_answer(question: Question, p_yes: float) -> VqaAnswer:
    """A yes/no question answered by P(yes): "yes" when p_yes > 0.5; credit P(expected answer)."""
    if not question.is_yes_no:
        raise ValueError(f"likelihood mode answers yes/no questions only, not {question.question!r}")
    if not 0.0 <= p_yes <= 1.0:
        raise ValueError(f"P(yes) must be in [0, 1], got {p_yes}")
    expected = question.answer.lower()
    is_yes = p_yes > 0.5
    answer = "yes" if is_yes else "no"
    return VqaAnswer(question=question.question, element_type=question.element_type, expected=question.answer,
                     answer=answer, is_yes=is_yes, p_yes=p_yes, correct=answer == expected,
                     credit=p_yes if expected == "yes" else 1.0 - p_yes)


def choice_answer(question: Question, log_likelihoods: Sequence[float]) -> VqaAnswer:
    """A multiple-choice question answered by its choices' log-likelihoods (one per choice):
    the answer is the most likely choice (the first on a tie); credit P(expected choice), the
    likelihoods normalised over the choices."""
    if len(log_likelihoods) != len(question.choices):
        raise ValueError(f"{question.question!r}: {len(log_likelihoods)} likelihoods for "
                         f"{len(question.choices)} choices")
    logp = np.asarray(log_likelihoods, dtype=np.float64)
    if not np.all(np.isfinite(logp)):
        raise ValueError(f"{question.question!r}: non-finite choice log-likelihoods {logp.tolist()}")
    probs = np.exp(logp - logp.max())
    probs /= probs.sum()
    answer = question.choices[int(np.argmax(logp))]
    expected = question.choices.index(question.answer)
    return VqaAnswer(question=question.question, element_type=question.element_type, expected=question.answer,
                     answer=answer, is_yes=answer.lower() == "yes", p_yes=None,
                     correct=answer == question.answer, credit=float(min(1.0, probs[expected])))


def generated_answer(question: Question, text: str) -> VqaAnswer:
    """A generated answer, parsed strictly; credit 1 when correct, else 0."""
    correct = answer_is_correct(text, question)
    return VqaAnswer(question=question.question, element_type=question.element_type, expected=question.answer,
                     answer=text, is_yes=parse_yes_no(text) == "yes", p_yes=None, correct=correct,
                     credit=1.0 if correct else 0.0)


def score_from_answers(answers: Sequence[VqaAnswer]) -> float:
    """The VQA score of one candidate: 100 x the mean credit over its questions."""
    if not answers:
        raise ValueError("a VQA score needs at least one answered question")
    return 100.0 * sum(a.credit for a in answers) / len(answers)


class VqaScorer(Scorer):
    """BLIP-2 (OPT or Flan-T5 language model) answering yes-questions about an image."""

    name = "vqa"

    def __init__(self, path: str | Path, mode: str, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 16, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 8):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        if mode not in MODES:
            raise ValueError(f"scoring.vqa_mode is {mode!r}; expected one of {MODES}")
        if "{question}" not in prompt:
            raise ValueError(f"scoring.vqa_prompt {prompt!r} has no '{{question}}' placeholder")
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"scoring.vqa_path: {self.path} is not a directory "
                                    "(expected a local BLIP-2 folder)")
        self.mode, self.device, self.dtype = mode, device, dtype
        self.batch_size, self.prompt, self.max_new_tokens = batch_size, prompt, max_new_tokens
        self.model = Blip2ForConditionalGeneration.from_pretrained(self.path, dtype=dtype).to(device).eval()
        self.processor = Blip2Processor.from_pretrained(self.path)
        config = self.model.config
        if self.processor.num_query_tokens is None:
            self.processor.num_query_tokens = config.num_query_tokens
        if self.processor.num_query_tokens != config.num_query_tokens:
            raise ValueError(f"{self.path}: processor num_query_tokens {self.processor.num_query_tokens} "
                             f"!= model num_query_tokens {config.num_query_tokens}")
        image_token = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token.content)
        if config.image_token_index is None or config.image_token_index != image_token:
            raise ValueError(
                f"{self.path}: config.image_token_index is {config.image_token_index} but the tokenizer's "
                f"image token has id {image_token}; this folder predates transformers' BLIP-2 image-token "
                "format (re-save it with a current transformers release)")
        self.decoder_only = bool(config.use_decoder_only_language_model)
        tokenizer = self.processor.tokenizer
        # Decoder-only models continue the prompt, so the prompt must end at the last position
        # of every row for batched generation; left padding does that.
        tokenizer.padding_side = "left" if self.decoder_only else "right"
        self.yes_ids = self._single_token_ids(_YES_SPELLINGS)
        self.no_ids = self._single_token_ids(_NO_SPELLINGS)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"{self.path}: yes and no share token ids {set(self.yes_ids) & set(self.no_ids)}")

    def _single_token_ids(self, spellings: Sequence[str]) -> list[int]:
        ids = set()
        for s in spellings:
            toks = self.processor.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(int(toks[0]))
        if not ids:
            raise ValueError(f"{self.path}: none of {list(spellings)} is a single token of the tokenizer, "
                             "so the likelihood mode cannot read its probability")
        return sorted(ids)

    @property
    def version(self) -> str:
        lm = "opt" if self.decoder_only else "t5"
        return f"blip2-{lm}:{self.path.name}:{self.mode}"

    def _inputs(self, images: Sequence[Image.Image], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [self.prompt.format(question=q) for q in questions]
        enc = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc

    @torch.no_grad()
    def yes_probabilities(self, images: Sequence[Image.Image], questions: Sequence[str]) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) of the next token, per (image, question) pair."""
        out = []
        for sl in batches(len(questions), self.batch_size):
            enc = self._inputs(images[sl], questions[sl])
            n = enc["input_ids"].shape[0]
            if self.decoder_only:
                logits = self.model(**enc).logits
                mask = enc["attention_mask"]
                # Position of the last attended token, whatever the padding side.
                last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
                logits = logits[torch.arange(n, device=logits.device), last]
            else:
                start = self.model.config.text_config.decoder_start_token_id
                if start is None:
                    raise ValueError(f"{self.path}: text_config.decoder_start_token_id is not set")
                decoder_input_ids = torch.full((n, 1), start, dtype=torch.long, device=self.device)
                logits = self.model(**enc, decoder_input_ids=decoder_input_ids).logits[:, 0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
            no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
            out.append(torch.sigmoid(yes - no).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,))

    def _choice_ids(self, choice: str) -> list[int]:
        """The tokens of `choice` as a whole answer: its text (after a space for decoder-only
        models, which continue "Answer:"), then the language model's end token if it has one."""
        text = " " + choice if self.decoder_only else choice
        ids = list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"{self.path}: the choice {choice!r} tokenizes to nothing")
        end = self.model.config.text_config.eos_token_id
        return ids + ([int(end)] if end is not None else [])

    @torch.no_grad()
    def choice_log_likelihoods(self, images: Sequence[Image.Image], questions: Sequence[str],
                               choices: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per (image, question), log P(choice | image, question) of each of its choices."""
        rows = [(i, self._choice_ids(c)) for i, cs in enumerate(choices) for c in cs]
        pad = self.processor.tokenizer.pad_token_id or 0
        totals: list[float] = []
        for sl in batches(len(rows), self.batch_size):
            chunk = rows[sl]
            enc = self._inputs([images[i] for i, _ in chunk], [questions[i] for i, _ in chunk])
            width = max(len(ids) for _, ids in chunk)
            target = torch.full((len(chunk), width), pad, dtype=torch.long, device=self.device)
            mask = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
            for r, (_, ids) in enumerate(chunk):
                target[r, :len(ids)] = torch.tensor(ids, device=self.device)
                mask[r, :len(ids)] = 1
            if self.decoder_only:
                # Prompts are left-padded, so every row's prompt ends at the same position and the
                # choice follows it; padding after the choice cannot affect it (causal attention).
                start = enc["input_ids"].shape[1]
                logits = self.model(
                    pixel_values=enc["pixel_values"], input_ids=torch.cat([enc["input_ids"], target], dim=1),
                    attention_mask=torch.cat([enc["attention_mask"], mask], dim=1)).logits
                logits = logits[:, start - 1:start - 1 + width]
            else:
                first = self.model.config.text_config.decoder_start_token_id
                if first is None:
                    raise ValueError(f"{self.path}: text_config.decoder_start_token_id is not set")
                decoder_input_ids = torch.cat(
                    [torch.full((len(chunk), 1), first, dtype=torch.long, device=self.device), target[:, :-1]], dim=1)
                logits = self.model(**enc, decoder_input_ids=decoder_input_ids).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None])[..., 0]
            totals += (logp * mask).sum(dim=1).double().cpu().tolist()
        out, k = [], 0
        for cs in choices:
            out.append(np.array(totals[k:k + len(cs)]))
            k += len(cs)
        return out

    @torch.no_grad()
    def generate_answers(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        """Greedy answers, prompt stripped, special tokens removed."""
        answers: list[str] = []
        for sl in batches(len(questions), self.batch_size):
            enc = self._inputs(images[sl], questions[sl])
            generated = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                            num_beams=1)
            if self.decoder_only:
                # Decoder-only generate returns prompt + continuation.
                generated = generated[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in self.processor.batch_decode(generated, skip_special_tokens=True)]
        return answers

    def answers(self, items: Sequence[ScoringItem]) -> list[tuple[VqaAnswer, ...]]:
        """Per item, one VqaAnswer per question, in the order of the item's questions."""
        images, texts, owners, expected = [], [], [], []
        for i, item in enumerate(items):
            if not item.questions:
                raise ValueError(f"VQA scoring needs questions; the item for {item.text!r} has none")
            for q in item.questions:
                images.append(item.image)
                texts.append(q.question)
                owners.append(i)
                expected.append(q)
        if not texts:
            return []
        if self.mode == "likelihood":
            results: list[VqaAnswer | None] = [None] * len(texts)
            yes_no = [k for k, q in enumerate(expected) if q.is_yes_no]
            multiple = [k for k, q in enumerate(expected) if not q.is_yes_no]
            if yes_no:
                p_yes = self.yes_probabilities([images[k] for k in yes_no], [texts[k] for k in yes_no])
                for k, p in zip(yes_no, p_yes):
                    results[k] = likelihood_answer(expected[k], float(p))
            if multiple:
                logps = self.choice_log_likelihoods([images[k] for k in multiple], [texts[k] for k in multiple],
                                                    [expected[k].choices for k in multiple])
                for k, logp in zip(multiple, logps):
                    results[k] = choice_answer(expected[k], logp)
        else:
            results = [generated_answer(q, a) for q, a in zip(expected, self.generate_answers(images, texts))]
        per_item: list[list[VqaAnswer]] = [[] for _ in items]
        for owner, result in zip(owners, results):
            per_item[owner].append(result)
        return [tuple(a) for a in per_item]

    def score_with_answers(self, items: Sequence[ScoringItem]) -> tuple[np.ndarray, list[tuple[VqaAnswer, ...]]]:
        answers = self.answers(items)
        return np.array([score_from_answers(a) for a in answers], dtype=np.float64), answers

    def score(self, items: Sequence[ScoringItem]) -> np.ndarray:
        return self.score_with_answers(items)[0]
