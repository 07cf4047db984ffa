"""Where each class word sits among a prompt's tokens, and one text embedding per class.

One word can be several BPE tokens ("zebracorn" -> z e b ra c or n), so a class is a
list of token positions, and its embedding is the mean of those tokens' hidden states
(Simoncini and Ankit's follow-up paper, Fig. 3). Positions index the padded input_ids the text
encoder sees: 0 is the start-of-text token. SDXL's two tokenizers share CLIP's BPE vocabulary and
differ only in their padding token, so the first one's positions index both encoders' states,
which SDXL's text conditioning holds side by side (``factory.diffusion.pipelines.encode_texts``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch


def _find_span(prompt: str, word: str, taken: list[tuple[int, int]]) -> tuple[int, int]:
    """Character span of the first case-insensitive occurrence of `word` not already taken.

    Whole-word occurrences win ("bus" in "a busy street with a bus" is the last word);
    a word inside a longer one ("dog" in "two dogs") is the fallback.
    """
    escaped = re.escape(word)
    for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
        for match in re.finditer(pattern, prompt, flags=re.IGNORECASE):
            if not any(match.start() < end and start < match.end() for start, end in taken):
                return match.span()
    raise ValueError(f"class word {word!r} not found in prompt {prompt!r}")


def class_token_positions(tokenizer, prompt: str, class_words: Sequence[str]) -> list[list[int]]:
    """For each class word, the indices of its tokens in the padded, truncated input_ids.

    A word occurring twice ("a dog and a dog") gives its first occurrence to the first
    class word naming it and the next one to the next. Needs a fast tokenizer
    (offset mapping). Raises ValueError if a word is absent or cut off by truncation.
    """
    encoding = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    taken: list[tuple[int, int]] = []
    positions = []
    for word in class_words:
        start, end = _find_span(prompt, word, taken)
        taken.append((start, end))
        # Special and padding tokens have empty (0, 0) spans and never overlap a word.
        tokens = [i for i, (s, e) in enumerate(offsets) if s < e and s < end and start < e]
        if not tokens or offsets[tokens[-1]][1] < end:
            raise ValueError(f"class word {word!r} is cut off by truncation at "
                             f"{tokenizer.model_max_length} tokens in prompt {prompt!r}")
        positions.append(tokens)
    return positions


def class_embeddings(hidden_states: torch.Tensor,
                     positions: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token embedding per class: (B, T, d) -> embeddings (B, O, d) and mask (B, O).

    `hidden_states`: the generator's text states (``encode_texts``: d = 768 for SD 1.5, 768 + 1280 =
    2048 for SDXL's two encoders side by side). `positions[b]` holds sample b's classes (from
    class_token_positions); O is the largest class count in the batch, and padded slots are zero
    with mask False.
    """
    batch, _, dim = hidden_states.shape
    if len(positions) != batch:
        raise ValueError(f"{len(positions)} position lists for a batch of {batch}")
    most = max((len(classes) for classes in positions), default=0)
    embeddings = hidden_states.new_zeros(batch, most, dim)
    mask = torch.zeros(batch, most, dtype=torch.bool, device=hidden_states.device)
    for b, classes in enumerate(positions):
        for o, tokens in enumerate(classes):
            embeddings[b, o] = hidden_states[b, list(tokens)].mean(dim=0)
            mask[b, o] = True
    return embeddings, mask
