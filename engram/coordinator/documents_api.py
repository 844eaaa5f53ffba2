"""The documents API over HTTP, beside the OpenAI-compatible endpoints (same tokens, TLS, limits and errors):

- `GET /v1/namespaces`: those holding documents that the token may read, with their document counts
- `GET /v1/namespaces/{namespace}/documents`: chunks, tokens, sha256 and when each was written
- `GET /v1/namespaces/{namespace}/documents/{document_id}`: the text back (document ids may contain "/")
- `DELETE /v1/namespaces/{namespace}/documents/{document_id}`, `DELETE /v1/namespaces/{namespace}`
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from .auth import Auth
from .engine import Engine
from .http_errors import api_error
from .validate import check_name


def documents_router(engine: Engine, auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/v1/namespaces")

    async def guarded(request: Request, namespace: str | None, work):
        """Checks, then the work; every failure in OpenAI's error shape."""
        try:
            header = request.headers.get("authorization", "")
            if namespace is None:
                return await work(auth.namespaces(header, "the HTTP header"))
            check_name("namespace", namespace)
            auth.check_header(header, namespace, "the HTTP header")
            return await work(None)
        except Exception as exc:
            raise api_error(exc) from None

    @router.get("")
    async def list_namespaces(request: Request):
        async def work(allowed):
            sizes = await engine.namespace_sizes()
            names = auth.readable(allowed, sizes)
            data = [{"id": n, "object": "namespace"} | asdict(sizes[n]) for n in names]
            return {"object": "list", "data": data}

        return await guarded(request, None, work)

    @router.get("/{namespace}/documents")
    async def list_documents(namespace: str, request: Request):
        async def work(_):
            docs = await engine.documents(namespace)
            data = [
                {"id": d.name, "object": "document", "chunks": d.chunks, "tokens": d.tokens}
                | {"sha256": d.digest, "written_at": d.written}
                for d in docs
            ]
            return {"object": "list", "data": data}

        return await guarded(request, namespace, work)

    @router.get("/{namespace}/documents/{document_id:path}")
    async def get_document(namespace: str, document_id: str, request: Request):
        async def work(_):
            check_name("document_id", document_id)
            text = await engine.document_text(namespace, document_id)
            return {"id": document_id, "object": "document", "text": text}

        return await guarded(request, namespace, work)

    @router.delete("/{namespace}/documents/{document_id:path}")
    async def delete_document(namespace: str, document_id: str, request: Request):
        async def work(_):
            check_name("document_id", document_id)
            chunks = await engine.delete(namespace, document_id)
            return {"id": document_id, "object": "document", "deleted": True, "chunks": chunks}

        return await guarded(request, namespace, work)

    @router.delete("/{namespace}")
    async def delete_namespace(namespace: str, request: Request):
        async def work(_):
            documents, chunks = await engine.delete_namespace(namespace)
            return {"id": namespace, "object": "namespace", "deleted": True, "documents": documents, "chunks": chunks}

        return await guarded(request, namespace, work)

    return router
