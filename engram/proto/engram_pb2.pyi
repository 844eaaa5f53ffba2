from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteRequest(_message.Message):
    __slots__ = ("namespace", "document_id", "text", "request_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    document_id: str
    text: bytes
    request_id: str
    def __init__(self, namespace: _Optional[str] = ..., document_id: _Optional[str] = ..., text: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class WriteReply(_message.Message):
    __slots__ = ("documents", "chunks", "tokens", "new_blocks", "seconds")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    documents: int
    chunks: int
    tokens: int
    new_blocks: int
    seconds: float
    def __init__(self, documents: _Optional[int] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ..., new_blocks: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("namespace", "question", "top_k", "max_new_tokens", "mode")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    question: str
    top_k: int
    max_new_tokens: int
    mode: str
    def __init__(self, namespace: _Optional[str] = ..., question: _Optional[str] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("chunk_id", "document_id", "seq", "offset", "score", "shard", "text")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    document_id: str
    seq: int
    offset: int
    score: float
    shard: int
    text: str
    def __init__(self, chunk_id: _Optional[str] = ..., document_id: _Optional[str] = ..., seq: _Optional[int] = ..., offset: _Optional[int] = ..., score: _Optional[float] = ..., shard: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("embed_s", "retrieve_s", "fetch_s", "ttft_s", "decode_s", "total_s")
    EMBED_S_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    embed_s: float
    retrieve_s: float
    fetch_s: float
    ttft_s: float
    decode_s: float
    total_s: float
    def __init__(self, embed_s: _Optional[float] = ..., retrieve_s: _Optional[float] = ..., fetch_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class AskReply(_message.Message):
    __slots__ = ("answer", "chunks", "timings", "context_tokens", "new_tokens", "prompt_tokens")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    timings: Timings
    context_tokens: int
    new_tokens: int
    prompt_tokens: int
    def __init__(self, answer: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., context_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class AskEvent(_message.Message):
    __slots__ = ("retrieval", "text", "reply")
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    retrieval: Retrieval
    text: str
    reply: AskReply
    def __init__(self, retrieval: _Optional[_Union[Retrieval, _Mapping]] = ..., text: _Optional[str] = ..., reply: _Optional[_Union[AskReply, _Mapping]] = ...) -> None: ...

class Retrieval(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("namespace", "query", "top_k")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    query: str
    top_k: int
    def __init__(self, namespace: _Optional[str] = ..., query: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class ReadReply(_message.Message):
    __slots__ = ("chunks", "readout", "timings")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    READOUT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    readout: _containers.RepeatedScalarFieldContainer[float]
    timings: Timings
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., readout: _Optional[_Iterable[float]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "document_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    document_id: str
    def __init__(self, namespace: _Optional[str] = ..., document_id: _Optional[str] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class ListNamespacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NamespaceInfo(_message.Message):
    __slots__ = ("name", "documents", "chunks", "tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    documents: int
    chunks: int
    tokens: int
    def __init__(self, name: _Optional[str] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ListNamespacesReply(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceInfo]
    def __init__(self, namespaces: _Optional[_Iterable[_Union[NamespaceInfo, _Mapping]]] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class DocumentInfo(_message.Message):
    __slots__ = ("document_id", "chunks", "tokens", "sha256", "written_at")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    chunks: int
    tokens: int
    sha256: str
    written_at: float
    def __init__(self, document_id: _Optional[str] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ..., sha256: _Optional[str] = ..., written_at: _Optional[float] = ...) -> None: ...

class ListDocumentsReply(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentInfo]
    def __init__(self, documents: _Optional[_Iterable[_Union[DocumentInfo, _Mapping]]] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("namespace", "document_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    document_id: str
    def __init__(self, namespace: _Optional[str] = ..., document_id: _Optional[str] = ...) -> None: ...

class DocumentPart(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    def __init__(self, text: _Optional[bytes] = ...) -> None: ...

class DeleteNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class DeleteNamespaceReply(_message.Message):
    __slots__ = ("documents", "chunks")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    documents: int
    chunks: int
    def __init__(self, documents: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard", "node", "documents", "chunks", "blocks", "tokens", "stored_bytes", "resident_bytes", "episodes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    node: str
    documents: int
    chunks: int
    blocks: int
    tokens: int
    stored_bytes: int
    resident_bytes: int
    episodes: int
    def __init__(self, shard: _Optional[int] = ..., node: _Optional[str] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., blocks: _Optional[int] = ..., tokens: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., episodes: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("shards", "documents", "chunks", "tokens", "stored_bytes", "bytes_per_token", "full_fp16_kv_bytes_per_token", "unique_bytes_per_token", "blocks", "rebalance")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FULL_FP16_KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REBALANCE_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    documents: int
    chunks: int
    tokens: int
    stored_bytes: int
    bytes_per_token: float
    full_fp16_kv_bytes_per_token: float
    unique_bytes_per_token: float
    blocks: int
    rebalance: Rebalance
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., tokens: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., bytes_per_token: _Optional[float] = ..., full_fp16_kv_bytes_per_token: _Optional[float] = ..., unique_bytes_per_token: _Optional[float] = ..., blocks: _Optional[int] = ..., rebalance: _Optional[_Union[Rebalance, _Mapping]] = ...) -> None: ...

class Rebalance(_message.Message):
    __slots__ = ("running", "moved_chunks", "scanned_shards", "total_shards", "error")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MOVED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCANNED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    running: bool
    moved_chunks: int
    scanned_shards: int
    total_shards: int
    error: str
    def __init__(self, running: _Optional[bool] = ..., moved_chunks: _Optional[int] = ..., scanned_shards: _Optional[int] = ..., total_shards: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class AddShardsRequest(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class AddShardsReply(_message.Message):
    __slots__ = ("shards", "added")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedScalarFieldContainer[int]
    added: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shards: _Optional[_Iterable[int]] = ..., added: _Optional[_Iterable[int]] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardCompaction(_message.Message):
    __slots__ = ("shard", "blocks_before", "blocks_after", "bytes_before", "bytes_after")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_AFTER_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    shard: int
    blocks_before: int
    blocks_after: int
    bytes_before: int
    bytes_after: int
    def __init__(self, shard: _Optional[int] = ..., blocks_before: _Optional[int] = ..., blocks_after: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ...) -> None: ...

class CompactReply(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardCompaction]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardCompaction, _Mapping]]] = ...) -> None: ...
