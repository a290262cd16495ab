"""Seconds of `generate` calls on the demo models after a first one: the same settings, a new temperature,
a new EOS list. A call that compiles again costs about the first call's time.

python benchmarks/recompile.py
"""
import time
import specpv_jax as sj
from specpv_jax.demo import demo_prompt, DEMO_SPEC
m = sj.demo_models()
prompt = demo_prompt(m.target.tokenizer, 1024)
for mode in ("ar", "exact"):
    draft = None if mode == "ar" else m.eagle3
    def call(t, eos):
        start = time.perf_counter()
        sj.generate(m.target, [prompt], 32, draft=draft, mode=mode, spec=DEMO_SPEC, temperature=t, top_p=0.9, seed=0,
                    eos_token_ids=eos)
        return time.perf_counter() - start
    first = call(0.7, (1,))
    again = call(0.7, (1,))
    new_t = call(0.9, (1,))
    new_eos = call(0.9, (2, 3))
    print(f"{mode}: first {first:.1f} s, same settings {again:.2f} s, new temperature {new_t:.2f} s, "
          f"new EOS list {new_eos:.2f} s", flush=True)
