import threading
import time

from mmfusion.index.decode import DecodeGate


def test_gate_limits_concurrency_and_measures_cost():
    gate = DecodeGate(4)
    running, peak, lock = [0], [0], threading.Lock()

    def work():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    def burst():
        ts = [threading.Thread(target=gate.run, args=(work,)) for _ in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    burst()
    assert peak[0] == 4
    gate.limit(2)
    peak[0] = 0
    burst()
    assert peak[0] == 2 and gate.active == 2
    gate.limit(4)
    assert gate.active == 4
    assert gate.count == 24 and gate.cpu_per_item() is not None
