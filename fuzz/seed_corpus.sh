#!/bin/sh
# Splits every captured fixture stream into one seed file per pgoutput message, for
# `cargo fuzz run decode fuzz/corpus/decode`. Each seed starts with the mode byte the target
# expects: protocol 3 (mode & 3 = 2) plus 4 when the message was inside a stream block.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/corpus/decode"
mkdir -p "$out"
python3 - "$here/../fixtures/pgoutput" "$out" <<'PY'
import glob, os, struct, sys
src, out = sys.argv[1], sys.argv[2]
n = 0
for path in sorted(glob.glob(os.path.join(src, "*.bin"))):
    data = open(path, "rb").read()
    pos, in_stream = 0, False
    while pos < len(data):
        _lsn, length = struct.unpack(">QI", data[pos:pos + 12])
        msg = data[pos + 12:pos + 12 + length]
        pos += 12 + length
        tag = msg[:1]
        mode = 2 | (4 if in_stream and tag != b"E" else 0)
        if tag == b"S":
            in_stream = True
        elif tag == b"E":
            in_stream = False
        name = "%s-%05d" % (os.path.basename(path)[:-4], n)
        open(os.path.join(out, name), "wb").write(bytes([mode]) + msg)
        n += 1
print(f"{n} seeds in {out}")
PY
