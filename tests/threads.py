"""run_in_threads: call fn(i) for i < n on n threads at once, for the thread-safety tests."""
import threading


def run_in_threads(fn, n: int) -> dict:
    """{i: fn(i)}; an exception in any thread fails the caller (AssertionError listing them)."""
    results, errors = {}, []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 — collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results
