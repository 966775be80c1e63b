"""Hypothesis strategies for every wire message, and the wire tests' hypothesis profiles.

Profiles (choose with ``QR_WIRE_HYPOTHESIS=wire-long``): ``wire`` (default, CI-sized,
keeps the wire suite within its time budget) and ``wire-long`` for a deeper local run.
They are applied per test with ``@WIRE_SETTINGS``, never loaded globally, so other
suites' hypothesis settings are unaffected.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from quic_reverse.wire import (
    CloseCode,
    Features,
    Hello,
    HelloAck,
    Message,
    Metadata,
    MetadataValue,
    OpenFlags,
    OpenRequest,
    OpenResponse,
    OpenStatus,
    Ping,
    Pong,
    RejectCode,
    StreamClose,
)

settings.register_profile(
    "wire",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "wire-long",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
WIRE_SETTINGS = settings.get_profile(os.environ.get("QR_WIRE_HYPOTHESIS", "wire"))

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=40)
opt_text = st.none() | text

features = u32.map(Features)
open_flags = u8.map(OpenFlags)

metadata_value: st.SearchStrategy[MetadataValue] = st.one_of(
    text, i64, st.booleans(), st.binary(max_size=40)
)
metadata: st.SearchStrategy[Metadata] = st.one_of(
    st.just(Metadata.EMPTY),
    st.binary(max_size=64).map(Metadata.from_bytes),
    st.dictionaries(text, metadata_value, max_size=6).map(
        lambda d: Metadata.structured(list(d.items()))
    ),
)
open_status = st.one_of(
    st.just(OpenStatus.ACCEPTED), st.sampled_from(RejectCode).map(OpenStatus.rejected)
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, protocol_version=u16, features=features, agent=opt_text),
    st.builds(HelloAck, selected_version=u16, selected_features=features),
    st.builds(OpenRequest, request_id=u64, service=text, metadata=metadata, flags=open_flags),
    st.builds(
        OpenResponse,
        request_id=u64,
        status=open_status,
        reason=opt_text,
        logical_stream_id=st.none() | u64,
    ),
    st.builds(StreamClose, logical_stream_id=u64, code=st.sampled_from(CloseCode), reason=opt_text),
    st.builds(Ping, sequence=u64),
    st.builds(Pong, sequence=u64),
)
