"""Misbehaves as the completion says: each behaviour is one way an env can fail."""

import os
import sys
import time


def score(prompt, completion, **fields):
    what = completion.split(":")[0]
    if what == "ok":
        return 1.0
    if what == "zero":
        return 0.0
    if what == "info":
        return {"score": 0.5, "info": {"seen": completion}}
    if what == "sleep":  # hangs past the pool's timeout
        time.sleep(3600)
    if what == "busy":  # a CPU-bound hang that ignores signals
        while True:
            pass
    if what == "slow":  # a little work, for the kill -9 test
        time.sleep(float(completion.split(":")[1]))
        return 1.0
    if what == "exit":
        os._exit(3)
    if what == "crash_once":  # crashes the first time it sees this marker file missing
        marker = fields["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(4)
        return 1.0
    if what == "nan":
        return float("nan")
    if what == "inf":
        return float("inf")
    if what == "str":
        return "1.0"
    if what == "bool":
        return True
    if what == "none":
        return None
    if what == "bad_info":
        return {"score": 1.0, "info": {"obj": object()}}
    if what == "raise":
        raise ValueError("the reference answer is malformed")
    if what == "print":  # stray output must not corrupt the protocol
        print("garbage on stdout")
        os.write(1, b"raw garbage on fd 1\n")
        sys.stdout.flush()
        return 1.0
    raise KeyError(what)
