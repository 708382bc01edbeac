"""Trajectories on the wire: a msgpack codec with zero-copy arrays, and packing that holds each
unique image once per batch."""

from rollwire.transport.codec import Codec, codec_for, decode, encode
from rollwire.transport.packing import PackedBatch, pack, unpack

__all__ = ["Codec", "PackedBatch", "codec_for", "decode", "encode", "pack", "unpack"]
