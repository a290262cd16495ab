"""Run by tests/test_sharding.py as two processes of one multi-controller JAX job (`jax.distributed`, 4 fake
CPU devices each): every process makes the same calls, as on a multi-host TPU slice or GPU cluster.

python multihost_worker.py PROCESS_ID PORT WORKDIR; WORKDIR holds `hf/` (a target), `head/` (an orbax draft),
`prompts.json`, `spec.json` and the one-process tokens `tokens_{mode}.npy`; the target is saved to `saved/`.
"""

import json
import pathlib
import sys

import jax


def main(process_id: int, port: str, work: pathlib.Path) -> None:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np

    import specpv_jax as sj
    from specpv_jax import sharding

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    target = sj.load_target(work / "hf", progress=False)  # each process fills its own devices' shards
    mesh = sharding.mesh_of(target.params)
    assert mesh.shape == {"data": 2, "model": 4}, mesh.shape
    assert all(d.process_index == row for row, devices in enumerate(mesh.devices) for d in devices), \
        "model within a host"
    draft = sj.load_draft(work / "head", target)  # restored on this process's device, then split
    assert sharding.mesh_of(draft.params) == mesh
    spec = sj.SpecConfig(**json.loads((work / "spec.json").read_text()))
    prompts = json.loads((work / "prompts.json").read_text())
    for mode in ("ar", "exact"):
        out = sj.generate(target, prompts, 16, draft=draft, mode=mode, spec=spec, eos_token_ids=(5,))
        np.testing.assert_array_equal(out.tokens, np.load(work / f"tokens_{mode}.npy"))
    def failing(tokens):
        raise KeyError("from the stream")

    try:  # the stream runs in process 0; every process raises (none waits for the others)
        sj.generate(target, prompts, 4, stream=failing)
        raise AssertionError("the stream's error was lost")
    except (KeyError, RuntimeError) as e:
        assert "from the stream" in str(e) if jax.process_index() == 0 else "raised in process 0" in str(e), e
    sj.save_target(target, work / "saved")  # orbax writes each process's shards into one directory
    print("ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]))
