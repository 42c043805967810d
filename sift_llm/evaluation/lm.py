"""The lm-eval model sift-llm evaluates with: lm-eval's HFLM, plus exact token scoring for dataset docs.

A loglikelihood request whose doc carries the prepared dataset's ``input_ids`` and ``labels`` (the
held-out task's docs do) is scored on exactly those tokens: one (context, continuation) token pair per
learned span, handed to HFLM's own ``_loglikelihood_tokens``, and the span log-likelihoods summed. Every
other request (MMLU, any lm-eval task) goes through HFLM unchanged, strings re-tokenised as usual.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM

from sift_llm.evaluation.heldout import token_requests


def dataset_tokens(doc: Any) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) when ``doc`` is a dataset example that carries its tokens, else None."""
    if not isinstance(doc, dict):
        return None
    ids, labels = doc.get("input_ids"), doc.get("labels")
    if isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels) and ids:
        return ids, labels
    return None


class DatasetTokensLM(HFLM):
    """HFLM whose loglikelihood scores a dataset doc's own label tokens (see the module docstring)."""

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        exact = [i for i, req in enumerate(requests) if dataset_tokens(req.doc) is not None]
        chosen = set(exact)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        plain = [i for i in range(len(requests)) if i not in chosen]
        if plain:
            for i, scored in zip(plain, super().loglikelihood([requests[i] for i in plain], disable_tqdm)):
                out[i] = scored
        if exact:
            pairs, owner = [], []
            for i in exact:
                ids, labels = dataset_tokens(requests[i].doc)
                for context, continuation in token_requests(ids, labels):
                    pairs.append((tuple(requests[i].args), context, continuation))
                    owner.append(i)
            sums = {i: [0.0, True] for i in exact}
            for i, (loglikelihood, greedy) in zip(owner, self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)):
                sums[i][0] += float(loglikelihood)
                sums[i][1] = sums[i][1] and bool(greedy)
            for i in exact:
                out[i] = (sums[i][0], sums[i][1])
        return out  # type: ignore[return-value]
