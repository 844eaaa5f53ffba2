"""Concurrent asks through the service are decoded together (ask.max_batch) and each gets the answer it gets
alone; a batch member that gives up stops only its own row."""

import threading

import grpc
import pytest
import ray

from engram.coordinator.client import EngramClient
from engram.evals.haystack import PASSKEY_QUESTION, passkey_context

pytestmark = pytest.mark.integration

KEYS = [31547, 80262, 46619, 12873, 59304, 77451]


@pytest.fixture(scope="module")
def keyed(service, tokenizer):
    c = EngramClient(service.address, timeout=600)
    for k in KEYS:
        c.write([(f"key-{k}", passkey_context(1500, 0.4, k, tokenizer))], namespace=f"batch-{k}")
    return c


def ask_all(c, max_new: int = 8) -> dict[int, str]:
    out, threads = {}, []

    def one(k):
        out[k] = c.ask(PASSKEY_QUESTION, namespace=f"batch-{k}", max_new_tokens=max_new).answer

    for k in KEYS:
        threads.append(threading.Thread(target=one, args=(k,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return out


def test_concurrent_asks_are_batched_and_answer_as_alone(service, keyed):
    decoder = service.engine.decoder
    alone = {k: keyed.ask(PASSKEY_QUESTION, namespace=f"batch-{k}", max_new_tokens=8).answer for k in KEYS}
    assert any(str(k) in a for k, a in alone.items()), alone  # the blocks reach the decoder
    seen = len(ray.get(decoder.batch_sizes.remote()))
    together = ask_all(keyed)
    assert together == alone
    sizes = ray.get(decoder.batch_sizes.remote())[seen:]
    assert max(sizes) > 1, sizes  # some asks shared a batch
    assert sum(sizes) == len(KEYS)


def test_a_caller_leaving_a_batch_stops_only_its_row(service, keyed):
    decoder = service.engine.decoder
    before = ray.get(decoder.answers.remote())
    short = EngramClient(service.address, timeout=0.8)  # gives up mid-answer
    result = {}
    t = threading.Thread(target=lambda: result.update(ask_all(keyed, max_new=24)))
    t.start()
    with pytest.raises(grpc.RpcError) as e:
        short.ask("Tell the whole story of the grass and the sky.", namespace=f"batch-{KEYS[0]}", max_new_tokens=400)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    t.join()
    assert all(
        str(k) in result[k] for k in KEYS if str(k) in keyed.ask(PASSKEY_QUESTION, namespace=f"batch-{k}").answer
    )
    assert ray.get(decoder.answers.remote()) == before + 2 * len(KEYS)  # the given-up ask never counted
