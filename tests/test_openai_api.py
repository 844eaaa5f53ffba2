"""The OpenAI-compatible HTTP API, driven by the official `openai` client, and the streamed gRPC Ask: a second
server (bearer tokens, TLS, HTTP on a free port) over the session's engine, on 127.0.0.1."""

import asyncio
import copy
import ssl
import time

import grpc
import openai
import pytest

from engram.coordinator.client import EngramClient
from engram.coordinator.server import start_server, stop_server

pytestmark = pytest.mark.integration

FACT = "The vault beneath the old mill opens with the code 4417-KESTREL."
FILLER = " ".join(f"Line {i}: the river carried timber past the mill for the sawyers downstream." for i in range(60))
QUESTION = "What code opens the vault beneath the old mill? The code is"


@pytest.fixture(scope="module")
def api(service, tls_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    (d / "tokens.toml").write_text(
        '[tokens]\n"carol-token" = ["carol"]\n"admin-token" = ["*"]\n"dave-token" = ["dave", "empty"]\n'
    )
    cfg = copy.deepcopy(service.cfg)
    cfg.auth.tokens_file = str(d / "tokens.toml")
    cfg.server.tls_cert_file, cfg.server.tls_key_file = map(str, tls_files)
    server, port = asyncio.run_coroutine_threadsafe(start_server(service.engine, cfg, 0, 0), service.loop).result(60)
    ca = tls_files[0].read_bytes()
    admin = EngramClient(f"127.0.0.1:{port}", root_certificates=ca, token="admin-token", timeout=300)
    admin.write([("mill", f"{FILLER} {FACT} {FILLER}")], namespace="carol")
    admin.write([("dave-notes", "Dave's bicycle is green and lives in the shed.")], namespace="dave")
    yield {
        "grpc": f"127.0.0.1:{port}",
        "http": f"https://127.0.0.1:{server.http_port}/v1",
        "ca": ca,
        "ssl": ssl.create_default_context(cafile=str(tls_files[0])),
        "engine": service.engine,
    }
    asyncio.run_coroutine_threadsafe(stop_server(server), service.loop).result(60)


def client(api, token: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=api["ssl"], trust_env=False)
    return openai.OpenAI(base_url=api["http"], api_key=token, http_client=http, max_retries=0, timeout=120)


def test_models_are_the_tokens_namespaces(api):
    assert "carol" in [m.id for m in client(api, "admin-token").models.list()]
    assert [m.id for m in client(api, "carol-token").models.list()] == ["carol"]  # never dave's
    assert [m.id for m in client(api, "dave-token").models.list()] == ["dave"]  # "empty" holds nothing
    assert client(api, "carol-token").models.retrieve("carol").id == "carol"
    with pytest.raises(openai.NotFoundError):
        client(api, "carol-token").models.retrieve("dave")
    # the documents API is guarded alike, over HTTP and gRPC
    carol = client(api, "carol-token")
    assert [n["id"] for n in carol.get("/namespaces", cast_to=object)["data"]] == ["carol"]
    assert [d["id"] for d in carol.get("/namespaces/carol/documents", cast_to=object)["data"]] == ["mill"]
    with pytest.raises(openai.PermissionDeniedError):
        carol.get("/namespaces/dave/documents/dave-notes", cast_to=object)
    with pytest.raises(openai.PermissionDeniedError):
        carol.delete("/namespaces/dave", cast_to=object)
    c = EngramClient(api["grpc"], root_certificates=api["ca"], token="carol-token", timeout=60)
    assert [n.name for n in c.namespaces()] == ["carol"]
    with pytest.raises(grpc.RpcError) as e:
        c.get_document("dave-notes", namespace="dave")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_chat_completion_answers_from_memory(api):
    r = client(api, "carol-token").chat.completions.create(
        model="carol", messages=[{"role": "user", "content": QUESTION}], max_tokens=12
    )
    assert r.object == "chat.completion" and r.model == "carol"
    assert "4417" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    ext = r.model_extra["engram"]
    assert any(c["document_id"] == "mill" for c in ext["chunks"])
    assert ext["timings"]["ttft_s"] > 0
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > ext["context_tokens"] > 0

    # /v1/completions: the same question, the same greedy answer
    c = client(api, "carol-token").completions.create(model="carol", prompt=QUESTION, max_tokens=12)
    assert c.choices[0].text == r.choices[0].message.content


def test_streamed_chat_equals_the_whole_answer(api):
    oai = client(api, "carol-token")
    whole = oai.chat.completions.create(model="carol", messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
    t0 = time.perf_counter()
    stream = oai.chat.completions.create(
        model="carol",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, arrivals, reasons, usage, ext = [], [], [], None, None
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                arrivals.append(time.perf_counter() - t0)
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
                ext = chunk.model_extra["engram"]
        else:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) >= 2 and arrivals[0] < arrivals[-1]  # token by token, not all at once
    assert reasons == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert [c["chunk_id"] for c in ext["chunks"]] == [c["chunk_id"] for c in whole.model_extra["engram"]["chunks"]]


def test_http_errors_say_what_to_fix(api):
    msg = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.AuthenticationError) as e:
        client(api, "wrong-token").chat.completions.create(model="carol", messages=msg)
    assert "unknown token" in str(e.value)
    with pytest.raises(openai.PermissionDeniedError):
        client(api, "carol-token").chat.completions.create(model="dave", messages=msg)
    with pytest.raises(openai.PermissionDeniedError):  # streamed too: refused before any event
        client(api, "carol-token").chat.completions.create(model="dave", messages=msg, stream=True)
    with pytest.raises(openai.NotFoundError) as e:
        client(api, "dave-token").chat.completions.create(model="empty", messages=msg)
    assert "holds no documents" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client(api, "carol-token").chat.completions.create(model="carol", messages=msg, max_tokens=100_000)
    assert "max_tokens must be between 1 and" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client(api, "carol-token").chat.completions.create(model="carol", messages=[{"role": "system", "content": "x"}])
    assert "user message" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # a body that is not a chat request
        client(api, "carol-token").post("/chat/completions", body={"model": "carol"}, cast_to=object)
    assert "messages" in str(e.value) and "Traceback" not in str(e.value)


def test_plain_http_is_refused_on_the_tls_port(api):
    plain = openai.OpenAI(
        base_url=api["http"].replace("https:", "http:"), api_key="carol-token", max_retries=0, timeout=10
    )
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


def test_grpc_ask_stream(api):
    c = EngramClient(api["grpc"], root_certificates=api["ca"], token="carol-token", timeout=300)
    whole = c.ask(QUESTION, namespace="carol", max_new_tokens=24)
    events = list(c.ask_stream(QUESTION, namespace="carol", max_new_tokens=24))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "retrieval" and kinds[-1] == "reply" and set(kinds[1:-1]) == {"text"}, kinds
    reply = events[-1].reply
    assert "".join(e.text for e in events[1:-1]) == reply.answer == whole.answer
    assert [ch.chunk_id for ch in events[0].retrieval.chunks] == [ch.chunk_id for ch in reply.chunks]
    assert reply.new_tokens == whole.new_tokens >= 1
    with pytest.raises(grpc.RpcError) as e:
        list(c.ask_stream(QUESTION, namespace="dave"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_leaving_a_stream_stops_the_decoder(api):
    """A client that stops reading mid-answer: the decoder stops generating (no answer is counted)."""
    import ray

    decoder = api["engine"].decoder
    c = EngramClient(api["grpc"], root_certificates=api["ca"], token="carol-token", timeout=300)
    before = ray.get(decoder.answers.remote())
    question = "Tell the whole long history of the old mill, the river and the sawyers, line by line."
    for event in c.ask_stream(question, namespace="carol", max_new_tokens=512):
        if event.text:
            break  # the generator's close cancels the call
    assert c.ask(QUESTION, namespace="carol", max_new_tokens=8).answer  # answered after it, by the one decoder
    assert ray.get(decoder.answers.remote()) == before + 1  # this ask's answer only: the left one never finished
