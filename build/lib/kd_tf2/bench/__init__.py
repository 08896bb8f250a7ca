"""kd_tf2.bench: the two questions users bring to a KD benchmark, one command each.

    python -m kd_tf2.bench table --methods=all --fractions=1,0.5,0.25,0.1 [--seeds=0,1] \\
        [--runs_dir=runs/table] [--executor=subprocess|inprocess] [train.py flags ...]
    python -m kd_tf2.bench speed --arch=wrn_16_2 --teacher_arch=wrn_40_2 --methods=all \\
        [--batch_size=64 --steps=20 --warmup=5 --jit_compile --mixed_precision --json=PATH]

``table`` (``kd_tf2.bench.table``): which method wins at my data budget - trains (or resumes)
every (method, fraction, seed) into one runs directory, one shared teacher per fraction and seed,
and writes ``results.md`` / ``results.json`` (final and best test top-1, mean ± std over seeds).

``speed`` (``kd_tf2.bench.speed``): what a step costs - each method's steady-state training step
on random data (images/s, ms/step, peak RSS) and its ratio to the student trained alone and to
the floor (one student step plus one teacher forward pass).
"""
