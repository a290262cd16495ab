"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices: sharded vs one-device tokens.

`--every-mesh`: every mode on every mesh (the slow test); by default a subset.
"""

import sys

import jax
import numpy as np
from test_eagle import make_head, make_target

import specpv_jax as sj
from specpv_jax.sharding import make_mesh


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    target = make_target(32, layers=3, heads=8)
    head = make_head(target)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 32, n).tolist() for n in (300, 41, 260, 77, 300, 12, 150, 299)]
    spec = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8, retrieval_tokens=64, window_tokens=32)
    one = make_mesh(devices=jax.devices()[:1])
    # every mode on every mesh with --every-mesh; else on 2x4 (data and model axes both split)
    meshes = ((1, 8), (2, 4), (8, 1)) if "--every-mesh" in sys.argv else ((2, 4),)
    for mode in ("ar", "eagle", "exact"):
        draft = None if mode == "ar" else head
        expected = sj.generate(target, prompts, 24, draft=draft, mode=mode, spec=spec, mesh=one, eos_token_ids=(5,))
        for data, model in meshes:
            out = sj.generate(target, prompts, 24, draft=draft, mode=mode, spec=spec, mesh=make_mesh(data, model),
                              eos_token_ids=(5,))
            np.testing.assert_array_equal(out.lengths, expected.lengths)
            np.testing.assert_array_equal(out.tokens, expected.tokens)
            print(f"{mode} {data}x{model}: same tokens", flush=True)
    default = sj.generate(target, prompts, 24, eos_token_ids=(5,))  # more than one device: sharded by default
    np.testing.assert_array_equal(default.tokens, sj.generate(target, prompts, 24, mesh=one, eos_token_ids=(5,)).tokens)
    streamed = []
    out = sj.generate(target, prompts, 8, mesh=make_mesh(2, 4), prefill_chunk=64, progress=True,
                      stream=streamed.append, eos_token_ids=())  # host callbacks on a mesh
    np.testing.assert_array_equal(np.stack([np.concatenate([s[r] for s in streamed]) for r in range(8)]), out.tokens)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
