"""Seconds from process start to `import tfgcvit`, a built GCViT-Tiny (random weights) and its first prediction.

One fresh process per figure; compare revisions by alternating processes, e.g.
(an older revision checked out with `git worktree add /tmp/before REV`):

    for r in 1 2 3; do for dir in /tmp/before $PWD; do
      (cd $dir && KERAS_BACKEND=jax PYTHONPATH=$dir $OLDPWD/.venv/bin/python $OLDPWD/bench/first_output.py)
    done; done

`import tfgcvit` is lazy: Keras and the backend load in the "build" step.
"""

import time

start = time.perf_counter()

import json  # noqa: E402

import numpy as np  # noqa: E402

import tfgcvit  # noqa: E402

imported = time.perf_counter()
model = tfgcvit.GCViTTiny(weights=None)
built = time.perf_counter()
model.predict_on_batch(np.zeros((1, 224, 224, 3), "float32"))
predicted = time.perf_counter()
import keras  # noqa: E402

print(json.dumps({"backend": keras.backend.backend(), "import": round(imported - start, 2),
                  "build": round(built - imported, 2), "first_predict": round(predicted - built, 2),
                  "total": round(predicted - start, 2)}))
