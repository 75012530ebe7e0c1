"""Hugging Face generation settings (generation_config.json, or the model's config.json) as a GenerationConfig:
read by the Marian importer and by the runtime for Optimum folders, so that `generate` with a model's defaults does
what Hugging Face's `generate()` does. Settings without a rule here are named, never ignored."""

from __future__ import annotations

from typing import Any

from edgeformer.runtime.options import GenerationConfig

# Each setting this reads, with Hugging Face's default.
DEFAULTS: dict[str, Any] = {"num_beams": 1, "max_length": None, "min_length": 0, "do_sample": False,
                            "early_stopping": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                            "repetition_penalty": 1.0, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50,
                            "top_p": 1.0, "bad_words_ids": None, "forced_eos_token_id": None,
                            "forced_bos_token_id": None, "max_new_tokens": None, "encoder_no_repeat_ngram_size": 0,
                            "diversity_penalty": 0.0, "num_beam_groups": 1, "suppress_tokens": None,
                            "begin_suppress_tokens": None, "renormalize_logits": False}
# Those with no rule: any value but the default is refused.
NO_RULE = ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "repetition_penalty", "diversity_penalty",
           "num_beam_groups", "forced_bos_token_id", "begin_suppress_tokens", "renormalize_logits")
# Hugging Face's other settings that change what is generated: refused unless unset (or at their defaults).
OTHERS: dict[str, Any] = {"forced_decoder_ids": None, "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0,
                          "eta_cutoff": 0.0, "sequence_bias": None, "exponential_decay_length_penalty": None,
                          "penalty_alpha": None, "guidance_scale": None, "constraints": None,
                          "force_words_ids": None, "max_time": None, "stop_strings": None, "watermarking_config": None,
                          "min_new_tokens": None}
WHOLE = ("num_beams", "max_length", "min_length", "max_new_tokens", "num_return_sequences", "top_k")
NUMBERS = ("length_penalty", "temperature", "top_p")


def unsupported(settings: dict[str, Any], eos_id: int) -> list[str]:
    """The settings (name=value) that `from_hugging_face` cannot carry over faithfully; none if it can."""
    s = {k: settings.get(k, v) for k, v in DEFAULTS.items()}
    wrong = [f"{k}={s[k]!r} (not a whole number)" for k in WHOLE
             if s[k] is not None and (not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 0)]
    wrong += [f"{k}={s[k]!r} (not a number)" for k in NUMBERS
              if s[k] is not None and (not isinstance(s[k], (int, float)) or isinstance(s[k], bool))]
    wrong += [f"{k}={s[k]!r} (not a list of token ids)" for k in ("suppress_tokens", "bad_words_ids")
              if s[k] is not None and not isinstance(s[k], list)]
    if wrong:  # the rules below compare values: they need the right types
        return wrong
    problems = [f"{k}={s[k]!r}" for k in NO_RULE if s[k] not in (DEFAULTS[k], None)]
    problems += [f"{k}={settings[k]!r}" for k, default in OTHERS.items() if settings.get(k, default) != default]
    if s["do_sample"] and (s["num_beams"] or 1) > 1:
        problems.append(f"do_sample with num_beams={s['num_beams']} (beam sampling)")
    if s["max_new_tokens"] is not None and s["max_new_tokens"] < 1:
        problems.append(f"max_new_tokens={s['max_new_tokens']}")
    problems += [f"bad_words_ids entry {words} (only single tokens are supported)"
                 for words in s["bad_words_ids"] or [] if not isinstance(words, list) or len(words) != 1]
    if s["forced_eos_token_id"] not in (None, eos_id, [eos_id]):
        problems.append(f"forced_eos_token_id={s['forced_eos_token_id']} is not the EOS id {eos_id}")
    if s["early_stopping"] not in (True, False):
        problems.append(f"early_stopping={s['early_stopping']!r}")
    return problems


def from_hugging_face(settings: dict[str, Any], eos_id: int) -> GenerationConfig:
    """The settings as a GenerationConfig; call `unsupported` first: what it names is not carried."""
    s = {k: v if (v := settings.get(k)) is not None else d for k, d in DEFAULTS.items()}
    suppress = [int(t) for t in s["suppress_tokens"] or []]
    suppress += [int(words[0]) for words in s["bad_words_ids"] or [] if isinstance(words, list) and len(words) == 1]
    # max_length counts the decoder start token; unset, Hugging Face generates 20 new tokens.
    max_new = s["max_new_tokens"] if settings.get("max_new_tokens") is not None else (
        s["max_length"] - 1 if settings.get("max_length") is not None else 20)
    sample = bool(s["do_sample"])
    return GenerationConfig(strategy="sample" if sample else "beam" if s["num_beams"] > 1 else "greedy",
                            max_new_tokens=max_new, min_new_tokens=max(0, min(s["min_length"] - 1, max_new)),
                            num_beams=s["num_beams"], length_penalty=float(s["length_penalty"]),
                            num_return_sequences=s["num_return_sequences"], early_stopping=bool(s["early_stopping"]),
                            temperature=float(s["temperature"]), top_k=int(s["top_k"]) if sample else 0,
                            top_p=float(s["top_p"]), suppress_tokens=tuple(sorted(set(suppress))),
                            forced_eos=settings.get("forced_eos_token_id") is not None)
