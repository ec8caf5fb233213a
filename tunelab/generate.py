"""Generate text with a causal language model: a run's `model/` folder or anything `tunelab.models.resolve` accepts.

The same command takes a bundled alias (`smollm2`), a model folder or a finished run, so a model can be compared
before and after fine-tuning on the same prompts with the same settings. Prompts are rendered with the tokenizer's
own chat template (or fed as plain text with `--raw`); generation stops at the eos / end-of-turn token.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import setting
from tunelab.errors import UserError

# End-of-turn markers of common chat formats (ChatML, Llama 3, Gemma, Phi-3). A template's turn end is not always
# the tokenizer's eos; stopping only at the eos would let a model write the user's next turn itself.
log = logging.getLogger(__name__)

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class Sampling:
    """How answers are drawn. One field per CLI flag of `generate` and `chat`."""

    max_new_tokens: int = setting(128, "Most tokens generated per answer.", "--max-new-tokens")
    temperature: float = setting(0.0, "0 always takes the most likely token (greedy); higher values sample more freely.",
                                 "--temperature")
    top_p: float = setting(1.0, "Sample only from the most likely tokens that together hold this probability (nucleus).",
                           "--top-p")
    seed: int = setting(0, "Random seed set before every answer, so sampled answers can be reproduced.", "--seed")

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"must be at least 1, got {self.max_new_tokens}", "--max-new-tokens")
        if self.temperature < 0:
            raise UserError(f"must be 0 (greedy) or more, got {self.temperature}", "--temperature")
        if not 0 < self.top_p <= 1:
            raise UserError(f"must be in (0, 1], got {self.top_p}", "--top-p")


@dataclass
class Completion:
    text: str  # the new text only: special tokens skipped, stripped, cut before a stop string
    new_tokens: int  # generated tokens, the closing eos (or the stop string's tokens) included
    seconds: float
    finish: str = "stop"  # "length" when max_new_tokens ended it, else "stop" (end of turn or a stop string)
    logprobs: list[dict] | None = None  # per answer token: OpenAI's {token, logprob, bytes, top_logprobs}


def model_folder(name: str) -> Path:
    """A run folder's `model/`, else whatever `resolve` makes of the name (bundled alias or model folder)."""
    from tunelab.models import resolve

    p = Path(name)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        raise UserError("a run folder without model/config.json (did the run finish?)", name)
    try:
        return resolve(name)
    except UserError as e:  # resolve names the training flag (--model); here the model is the first argument
        raise UserError(e.problem, "MODEL") from None


def load_generator(model: str, device: str = "auto"):
    """(model, tokenizer) of a causal language model, on `device` (auto: the GPU when there is one). Never runs
    code shipped with the model: a folder that needs it is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging

    from tunelab.models import device_for

    where = device_for(device)  # before the load: a missing GPU should not cost one
    logging.disable_progress_bar()
    folder = model_folder(model)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config: {e}", str(folder)) from None
    # Check the saved architecture, not the model type: BERT has a causal-LM class too, so AutoModelForCausalLM
    # would happily load a BERT classifier's encoder under a fresh, random LM head.
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    archs = config.architectures or []
    if not any(a in causal for a in archs):
        raise UserError(f"not a causal language model ({', '.join(archs) or config.model_type}); generate and chat "
                        "need one that predicts the next token (a chat or clm run, or a generator like smollm2)",
                        str(folder))
    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model: {e}", str(folder)) from None
    return lm.to(where).eval(), tokenizer


def render(tokenizer, messages_or_text: str | list[dict]) -> str:
    """The model's input as text: a string is taken as is (continuation); messages go through the chat template."""
    if isinstance(messages_or_text, str):
        return messages_or_text
    if not tokenizer.chat_template:
        raise UserError("the tokenizer has no chat template (a base model?); use --raw to continue plain text "
                        "instead", tokenizer.name_or_path)
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # e.g. templates that refuse a system message
        raise UserError(f"the chat template refused the conversation: {e}", tokenizer.name_or_path) from None


def encode(tokenizer, messages_or_text: str | list[dict]) -> list[int]:
    text = render(tokenizer, messages_or_text)
    # Plain text gets the tokenizer's usual special tokens (a bos); a chat template writes its own.
    ids = tokenizer(text, add_special_tokens=isinstance(messages_or_text, str))["input_ids"]
    if not ids:
        raise UserError("the prompt is empty", "--prompt")
    return ids


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's and the tokenizer's eos, plus a known end-of-turn token."""
    configured = model.generation_config.eos_token_id
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    ids.append(tokenizer.eos_token_id)
    added = tokenizer.added_tokens_encoder
    ids += [added[t] for t in END_OF_TURN if t in added]
    return list(dict.fromkeys(i for i in ids if i is not None))


def complete(model, tokenizer, messages_or_text: str | list[dict], max_new_tokens: int = Sampling.max_new_tokens,
             temperature: float = Sampling.temperature, top_p: float = Sampling.top_p, seed: int = Sampling.seed,
             streamer=None, stop: tuple[str, ...] = (), logprobs: int | None = None) -> Completion:
    """One answer with its token count and time. `streamer` (e.g. transformers.TextStreamer) sees tokens as they
    come. `stop`: strings that end the answer (transformers' stop_strings), cut from the text as OpenAI does.
    `logprobs`: also each answer token's log-probability under the model (its raw distribution, before temperature
    and top-p) with this many most likely alternatives."""
    import torch

    Sampling(max_new_tokens, temperature, top_p, seed).check()
    ids = encode(tokenizer, messages_or_text)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) >= limit:
        raise UserError(f"the prompt has {len(ids)} tokens; the model reads at most {limit}", "--prompt")
    stops = stop_ids(model, tokenizer)
    if temperature > 0:
        # top_k=0 switches off transformers' default top-k of 50: only --temperature and --top-p shape sampling.
        mode = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        # Neutral values override a model's sampling defaults, which greedy search would ignore with a warning.
        mode = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    if stop:
        mode.update(stop_strings=list(stop), tokenizer=tokenizer)
    if logprobs is not None:
        mode.update(output_logits=True, return_dict_in_generate=True)
    input_ids = torch.tensor([ids], device=model.device)
    torch.manual_seed(seed)
    tic = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id
                             is not None else stops[0], streamer=streamer, **mode)
    seconds = time.perf_counter() - tic
    new = (out.sequences if logprobs is not None else out)[0, len(ids):].tolist()
    text = answer_text(tokenizer, new)
    cut = cut_at_stop(text, stop)
    finish = "stop" if cut < len(text) or len(new) < max_new_tokens or (new and new[-1] in stops) else "length"
    scored = _token_logprobs(tokenizer, new, out.logits, logprobs, cut) if logprobs is not None else None
    return Completion(text[:cut], len(new), seconds, finish, scored)


def check_best_of(n: int, sampling: Sampling) -> None:
    if n < 2:
        raise UserError(f"must be at least 2 (one answer is plain generation), got {n}", "--best-of")
    if sampling.temperature <= 0:
        raise UserError("best-of-n needs different answers to choose from: set --temperature above 0", "--best-of")


def best_of(model, tokenizer, messages: list[dict], n: int, score, sampling: Sampling) -> tuple[int, list, list]:
    """Best-of-n sampling (rejection sampling against a reward model: Nakano et al. 2021, WebGPT; Touvron et al.
    2023, Llama 2): `n` answers drawn with seeds seed, seed+1, ..., each scored by `score(messages, texts)`.
    Returns (index of the highest-scored answer, the completions, their scores). Answer 0 is the one `complete`
    gives with the same sampling, so the chosen answer scores at least as high as a plain sample."""
    check_best_of(n, sampling)
    fields = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
    completions = [complete(model, tokenizer, messages, seed=sampling.seed + i, **fields) for i in range(n)]
    scores = list(score(messages, [c.text for c in completions]))
    return max(range(n), key=scores.__getitem__), completions, scores


def answer_text(tokenizer, ids: list[int]) -> str:
    """An answer's text from its token ids: special tokens skipped, stripped. An answer cut by max_new_tokens may
    end inside a multi-byte character: that half character is dropped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip().rstrip("\ufffd")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> int:
    """Where the first stop string starts in `text` (its length when none occurs)."""
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else len(text)


def _token_logprobs(tokenizer, new: list[int], logits, top: int, keep_chars: int) -> list[dict]:
    """OpenAI's logprobs content for the answer's tokens, up to those that make its first `keep_chars`
    characters (a stop string's tokens are not part of the answer)."""
    import torch

    def entry(token_id: int, logp: float) -> dict:
        piece = tokenizer.decode([token_id])
        return {"token": piece, "logprob": logp, "bytes": list(piece.encode("utf-8"))}

    special, out = set(tokenizer.all_special_ids or []), []
    for step, token_id in enumerate(new):
        if token_id in special:
            break
        if len(tokenizer.decode(new[:step], skip_special_tokens=True).strip()) >= keep_chars and step:
            break
        logp = torch.log_softmax(logits[step][0].float(), -1)
        best = torch.topk(logp, top) if top else None
        out.append({**entry(token_id, float(logp[token_id])),
                    "top_logprobs": [entry(int(i), float(v)) for v, i in zip(best.values, best.indices)]
                    if best is not None else []})
    return out


def generate(model, tokenizer, messages_or_text: str | list[dict], max_new_tokens: int = Sampling.max_new_tokens,
             temperature: float = Sampling.temperature, top_p: float = Sampling.top_p, seed: int = Sampling.seed,
             streamer=None) -> str:
    """The new text only. Temperature 0 is greedy; the seed is set before generating, so answers repeat."""
    return complete(model, tokenizer, messages_or_text, max_new_tokens, temperature, top_p, seed, streamer).text


def fit_context(tokenizer, messages: list[dict], head: list[dict], model, max_new_tokens: int) -> list[dict]:
    """Drop the oldest exchanges until the conversation and the answer fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    while limit and len(messages) > len(head) + 1 and len(encode(tokenizer, messages)) + max_new_tokens > limit:
        messages = head + messages[len(head) + 2:]
        log.info("(oldest exchange dropped: the conversation outgrew the model's context)")
    return messages
