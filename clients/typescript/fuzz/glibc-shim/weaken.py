"""Marks an ELF object's need of one symbol version weak (VER_FLG_WEAK in its
.gnu.version_r), so that ld.so loads it where that version is missing: the
symbols of that version must then come from elsewhere (a preloaded library).
Run by ../setup-jazzer.sh:  python3 weaken.py FILE.node GLIBC_2.38"""

import struct
import sys

VER_FLG_WEAK = 2

path, version = sys.argv[1], sys.argv[2].encode()
b = bytearray(open(path, "rb").read())
if b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
    sys.exit(f"{path}: not a 64-bit little-endian ELF")
(shoff,) = struct.unpack_from("<Q", b, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)


def section(i):
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize
    return struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize)


def cstr(at):
    return bytes(b[at : b.index(0, at)])


names = section(shstrndx)[4]
sections = {cstr(names + section(i)[0]): section(i) for i in range(shnum)}
verneed = sections[b".gnu.version_r"]
dynstr = section(verneed[6])[4]
offset, weakened = verneed[4], 0
while True:
    _, count, _, aux, following = struct.unpack_from("<HHIII", b, offset)
    at = offset + aux
    for _ in range(count):
        _, flags, _, name, next_aux = struct.unpack_from("<IHHII", b, at)
        if cstr(dynstr + name) == version:
            struct.pack_into("<H", b, at + 4, flags | VER_FLG_WEAK)
            weakened += 1
        at += next_aux
    if not following:
        break
    offset += following
open(path, "wb").write(b)
print(f"{path}: {weakened} need(s) of {version.decode()} made weak")
