"""Why an example was selected: its score per task, how the tasks were mixed, and the target
examples whose predicted loss it moves most.

Sign convention (as everywhere in the engine): ``tau[i, j] > 0`` means training on candidate
i is predicted to *lower* target j's loss. A candidate's score for task t is the mean of its
row over t's targets, so the targets with the largest tau are the ones it helps most, and
the most negative ones those it is predicted to hurt.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer

from dsdm.selection import normalised_weights
from dsdm.tokenization import decode_parts

#: the two directions stored per candidate
EFFECTS = ("helps", "hurts")

CONTRIBUTION_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("effect", pa.string()),      # helps: largest tau; hurts: most negative tau
    ("rank", pa.int16()),         # 1 = the largest |tau| in that direction
    ("target_id", pa.string()),
    ("task", pa.string()),
    ("tau", pa.float32()),
])


def top_contributions(
    tau: torch.Tensor, example_ids: Sequence[str], target_ids: Sequence[str],
    target_tasks: Sequence[str], k: int,
) -> pa.Table:
    """Per candidate, the ``k`` targets with the largest tau (``helps``) and the ``k`` with
    the smallest, negative tau (``hurts``): a long table of ``CONTRIBUTION_SCHEMA``, 2 k rows
    per candidate at most (``hurts`` keeps only negative tau, ``helps`` only positive).

    tau: [N, T]; example_ids: [N]; target_ids, target_tasks: [T]. Ties break by target
    order (``torch.topk`` is not stable, so the order is fixed by a stable sort).
    """
    n, t = tau.shape
    if len(example_ids) != n or len(target_ids) != t or len(target_tasks) != t:
        raise ValueError(f"tau is {tuple(tau.shape)}, with {len(example_ids)} example ids, "
                         f"{len(target_ids)} target ids and {len(target_tasks)} target tasks")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, t)
    values = tau.to(torch.float32)
    columns: dict[str, list] = {name: [] for name in CONTRIBUTION_SCHEMA.names}
    for effect, sign in zip(EFFECTS, (1.0, -1.0), strict=True):
        order = torch.sort(-sign * values, dim=1, stable=True).indices[:, :k]  # [N, k]
        picked = values.gather(1, order)
        keep = (sign * picked) > 0
        rows, ranks = keep.nonzero(as_tuple=True)
        columns["example_id"] += [example_ids[i] for i in rows.tolist()]
        columns["effect"] += [effect] * len(rows)
        columns["rank"] += (ranks + 1).tolist()
        targets = order[rows, ranks].tolist()
        columns["target_id"] += [target_ids[j] for j in targets]
        columns["task"] += [target_tasks[j] for j in targets]
        columns["tau"] += picked[rows, ranks].tolist()
    return pa.table(columns, schema=CONTRIBUTION_SCHEMA)


def mixing_coefficients(
    task_scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
    *, standardise: bool = False,
) -> dict[str, float]:
    """Task -> c_t such that `dsdm.selection.combine_task_scores` is sum_t c_t score_t (up to
    float rounding): the normalised weight, divided by the task's spread over the pool when
    ``standardise``. A candidate's mixed score then splits into one part per task, c_t score_t,
    which is what ``dsdm explain`` prints. Tasks with weight 0 (or no spread) get 0."""
    coefficients = dict.fromkeys(task_scores, 0.0)
    for name, w in normalised_weights(task_scores, weights).items():
        spread = float(np.asarray(task_scores[name], dtype=np.float64).std()) if standardise else 1.0
        coefficients[name] = w / spread if spread > 0 else 0.0
    return coefficients


def target_text(tokenizer: Tokenizer, targets: pa.Table, target_ids: Sequence[str]) -> pa.Table:
    """target_id, task, prompt, continuation of the datamodel's target columns
    ``target_ids``, decoded from the target_tasks table ``targets`` as the proxies saw them."""
    row_of = {e: i for i, e in enumerate(targets.column("example_id").to_pylist())}
    chosen = targets.take([row_of[e] for e in target_ids])
    prompts, continuations = decode_parts(tokenizer, chosen)
    return pa.table({"target_id": list(target_ids), "task": chosen.column("task"),
                     "prompt": prompts, "continuation": continuations})
