"""C3PO (`moejax.generate.c3po`): the model's own prompt embeddings equal the unpadded
per-prompt means, the neighbours equal a brute-force NumPy kNN by cosine similarity, and the
re-mixing lowers the neighbours' kernel-weighted loss while moving only the critical layer's
core experts."""

import jax
import jax.numpy as jnp
import numpy as np
from tiny_decoder import tiny_decoder

from moejax.generate import generate
from moejax.generate.c3po import Reference, c3po_generate, embed, kernel_weights, nearest
from moejax.generate.routing import with_delta

REFERENCES = [
    Reference([3, 7, 1, 4], [9, 9, 2]),
    Reference([5, 2], [8, 1, 1, 6]),
    Reference([3, 7, 2], [4, 4]),
    Reference([11, 12, 13, 14, 15], [1, 2, 3]),
    Reference([3, 6, 1], [9, 2]),
]
PROMPT = [3, 7, 1]


def test_neighbours_are_the_numpy_knn_and_remixing_lowers_their_loss():
    model, variables = tiny_decoder()
    refs = embed(model, variables, [r.prompt for r in REFERENCES])
    apply = jax.jit(lambda v, x: model.apply(v, x, return_hidden=True)[0][0])
    for row, r in enumerate(REFERENCES):  # padding is excluded from each mean
        hidden = apply(variables, jnp.asarray([r.prompt]))[0]
        np.testing.assert_allclose(refs[row], np.asarray(hidden).mean(0), rtol=1e-5, atol=1e-6)
    query = embed(model, variables, [PROMPT])[0].astype(np.float64)
    brute = sorted(
        range(len(REFERENCES)),
        key=lambda i: (-query @ refs[i] / np.linalg.norm(query) / np.linalg.norm(refs[i]), i),
    )
    idx, sims = nearest(query, refs.astype(np.float64), 3)
    np.testing.assert_array_equal(idx, brute[:3])
    np.testing.assert_allclose(kernel_weights(sims, 0.5), np.exp(-(1 - sims) / 0.25))

    tokens, delta, report = c3po_generate(
        model, variables, PROMPT, REFERENCES, 4, num_samples=2, k=3, width=0.5,
        critical_layers=1, core_experts=2, steps=8, lr=0.3,
    )  # fmt: skip
    np.testing.assert_array_equal(report.neighbours, idx)
    assert len(report.losses) == 9 and report.losses[-1] < report.losses[0] - 1e-3
    # Only the last (critical) MoE layer moved, and there only its two core experts.
    np.testing.assert_array_equal(delta["runs_0"]["moe"]["router"]["logits"], 0.0)
    moved = np.asarray(delta["runs_1"]["moe"]["router"]["logits"])[0]
    assert 1 <= np.count_nonzero(moved) <= 2
    np.testing.assert_array_equal(
        tokens, generate(model, with_delta(variables, delta), np.array([PROMPT] * 2), 4)
    )
