from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEED_TYPE_UNSPECIFIED: _ClassVar[FeedType]
    HOME: _ClassVar[FeedType]
    EXPLORE: _ClassVar[FeedType]
    FOLLOWING: _ClassVar[FeedType]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    IN_NETWORK: _ClassVar[Source]
    OUT_OF_NETWORK: _ClassVar[Source]
    AD: _ClassVar[Source]
    TRENDING: _ClassVar[Source]

class SignalAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_ACTION_UNSPECIFIED: _ClassVar[SignalAction]
    VIEW: _ClassVar[SignalAction]
    CLICK: _ClassVar[SignalAction]
    LIKE: _ClassVar[SignalAction]
    COMMENT: _ClassVar[SignalAction]
    SHARE: _ClassVar[SignalAction]
    DWELL: _ClassVar[SignalAction]

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    HIDE: _ClassVar[FeedbackKind]
    NOT_INTERESTED: _ClassVar[FeedbackKind]
    SEE_LESS: _ClassVar[FeedbackKind]

class FeedbackTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_TARGET_UNSPECIFIED: _ClassVar[FeedbackTarget]
    POST: _ClassVar[FeedbackTarget]
    AUTHOR: _ClassVar[FeedbackTarget]
    TOPIC: _ClassVar[FeedbackTarget]

class ContentType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTENT_TYPE_UNSPECIFIED: _ClassVar[ContentType]
    TEXT: _ClassVar[ContentType]
    IMAGE: _ClassVar[ContentType]
    VIDEO: _ClassVar[ContentType]
FEED_TYPE_UNSPECIFIED: FeedType
HOME: FeedType
EXPLORE: FeedType
FOLLOWING: FeedType
SOURCE_UNSPECIFIED: Source
IN_NETWORK: Source
OUT_OF_NETWORK: Source
AD: Source
TRENDING: Source
SIGNAL_ACTION_UNSPECIFIED: SignalAction
VIEW: SignalAction
CLICK: SignalAction
LIKE: SignalAction
COMMENT: SignalAction
SHARE: SignalAction
DWELL: SignalAction
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
HIDE: FeedbackKind
NOT_INTERESTED: FeedbackKind
SEE_LESS: FeedbackKind
FEEDBACK_TARGET_UNSPECIFIED: FeedbackTarget
POST: FeedbackTarget
AUTHOR: FeedbackTarget
TOPIC: FeedbackTarget
CONTENT_TYPE_UNSPECIFIED: ContentType
TEXT: ContentType
IMAGE: ContentType
VIDEO: ContentType

class HeadScores(_message.Message):
    __slots__ = ("click", "like", "comment", "share", "long_dwell", "negative")
    CLICK_FIELD_NUMBER: _ClassVar[int]
    LIKE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    LONG_DWELL_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    click: float
    like: float
    comment: float
    share: float
    long_dwell: float
    negative: float
    def __init__(self, click: _Optional[float] = ..., like: _Optional[float] = ..., comment: _Optional[float] = ..., share: _Optional[float] = ..., long_dwell: _Optional[float] = ..., negative: _Optional[float] = ...) -> None: ...

class FeedItem(_message.Message):
    __slots__ = ("post_id", "author_id", "score", "heads", "source", "position", "reasons")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    author_id: int
    score: float
    heads: HeadScores
    source: Source
    position: int
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, post_id: _Optional[int] = ..., author_id: _Optional[int] = ..., score: _Optional[float] = ..., heads: _Optional[_Union[HeadScores, _Mapping]] = ..., source: _Optional[_Union[Source, str]] = ..., position: _Optional[int] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class GetFeedRequest(_message.Message):
    __slots__ = ("user_id", "feed_type", "cursor", "limit")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FEED_TYPE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    feed_type: FeedType
    cursor: str
    limit: int
    def __init__(self, user_id: _Optional[int] = ..., feed_type: _Optional[_Union[FeedType, str]] = ..., cursor: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class GetFeedResponse(_message.Message):
    __slots__ = ("items", "next_cursor", "model_version", "experiments", "degraded", "degraded_reasons", "request_id", "from_cache")
    class ExperimentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FeedItem]
    next_cursor: str
    model_version: str
    experiments: _containers.ScalarMap[str, str]
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    from_cache: bool
    def __init__(self, items: _Optional[_Iterable[_Union[FeedItem, _Mapping]]] = ..., next_cursor: _Optional[str] = ..., model_version: _Optional[str] = ..., experiments: _Optional[_Mapping[str, str]] = ..., degraded: bool = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., from_cache: bool = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("post_id", "action", "dwell_ms", "position", "request_id", "ts_ms", "author_id")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DWELL_MS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    action: SignalAction
    dwell_ms: int
    position: int
    request_id: str
    ts_ms: int
    author_id: int
    def __init__(self, post_id: _Optional[int] = ..., action: _Optional[_Union[SignalAction, str]] = ..., dwell_ms: _Optional[int] = ..., position: _Optional[int] = ..., request_id: _Optional[str] = ..., ts_ms: _Optional[int] = ..., author_id: _Optional[int] = ...) -> None: ...

class SubmitSignalsRequest(_message.Message):
    __slots__ = ("user_id", "signals")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    signals: _containers.RepeatedCompositeFieldContainer[Signal]
    def __init__(self, user_id: _Optional[int] = ..., signals: _Optional[_Iterable[_Union[Signal, _Mapping]]] = ...) -> None: ...

class SubmitSignalsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("user_id", "kind", "target", "post_id", "author_id", "topic", "ts_ms")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    kind: FeedbackKind
    target: FeedbackTarget
    post_id: int
    author_id: int
    topic: int
    ts_ms: int
    def __init__(self, user_id: _Optional[int] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., target: _Optional[_Union[FeedbackTarget, str]] = ..., post_id: _Optional[int] = ..., author_id: _Optional[int] = ..., topic: _Optional[int] = ..., ts_ms: _Optional[int] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishPostRequest(_message.Message):
    __slots__ = ("author_id", "topic", "content_type", "text", "is_repost", "original_post_id", "policy_flagged", "post_id", "ts_ms")
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_REPOST_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_POST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    author_id: int
    topic: int
    content_type: ContentType
    text: str
    is_repost: bool
    original_post_id: int
    policy_flagged: bool
    post_id: int
    ts_ms: int
    def __init__(self, author_id: _Optional[int] = ..., topic: _Optional[int] = ..., content_type: _Optional[_Union[ContentType, str]] = ..., text: _Optional[str] = ..., is_repost: bool = ..., original_post_id: _Optional[int] = ..., policy_flagged: bool = ..., post_id: _Optional[int] = ..., ts_ms: _Optional[int] = ...) -> None: ...

class PublishPostResponse(_message.Message):
    __slots__ = ("post_id", "fanned_out", "lazy_fanout")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    FANNED_OUT_FIELD_NUMBER: _ClassVar[int]
    LAZY_FANOUT_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    fanned_out: int
    lazy_fanout: bool
    def __init__(self, post_id: _Optional[int] = ..., fanned_out: _Optional[int] = ..., lazy_fanout: bool = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("user_id", "author_id", "ts_ms")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    author_id: int
    ts_ms: int
    def __init__(self, user_id: _Optional[int] = ..., author_id: _Optional[int] = ..., ts_ms: _Optional[int] = ...) -> None: ...

class FollowResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: bool = ...) -> None: ...

class DebugRankingRequest(_message.Message):
    __slots__ = ("user_id", "post_id", "feed_type")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    FEED_TYPE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    post_id: int
    feed_type: FeedType
    def __init__(self, user_id: _Optional[int] = ..., post_id: _Optional[int] = ..., feed_type: _Optional[_Union[FeedType, str]] = ...) -> None: ...

class StageDecision(_message.Message):
    __slots__ = ("stage", "decision", "score", "rank", "of", "detail")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    OF_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    decision: str
    score: float
    rank: int
    of: int
    detail: str
    def __init__(self, stage: _Optional[str] = ..., decision: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., of: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class DebugRankingResponse(_message.Message):
    __slots__ = ("post_id", "served", "position", "features", "heads", "stages", "model_version", "experiments")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ExperimentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    post_id: int
    served: bool
    position: int
    features: _containers.ScalarMap[str, float]
    heads: HeadScores
    stages: _containers.RepeatedCompositeFieldContainer[StageDecision]
    model_version: str
    experiments: _containers.ScalarMap[str, str]
    def __init__(self, post_id: _Optional[int] = ..., served: bool = ..., position: _Optional[int] = ..., features: _Optional[_Mapping[str, float]] = ..., heads: _Optional[_Union[HeadScores, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[StageDecision, _Mapping]]] = ..., model_version: _Optional[str] = ..., experiments: _Optional[_Mapping[str, str]] = ...) -> None: ...
