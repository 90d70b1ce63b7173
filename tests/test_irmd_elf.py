"""What the dynamic loader takes for a program the IRMd starts (`bind program ... auto`): its loader
(PT_INTERP), its RPATH and RUNPATH directories and the libraries it names by path must be ones only
root or the program's user could have written (spawn.check_program); irmd/elf.py reads them from
ELF files of either class and byte order, and a malformed one is refused, never a crash.

The ELF files are written here byte by byte (not to run: to be read), and, where a C compiler is
found, built by it as well. Run as any user: the checks' user is the one running the test, and only
a directory of another user's (uid 65534) needs root.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from irmd import elf
from irmd.spawn import check_program
from transports.unix import TrustError

pytestmark = pytest.mark.timeout(60)

ME = os.geteuid()
NOBODY = 65534
LOADER = os.path.realpath("/bin/sh")  # in PT_INTERP's place: any file only root could have written
CC = shutil.which("cc") or shutil.which("gcc")
needs_root = pytest.mark.skipif(ME != 0, reason="a directory of uid 65534's needs root to make")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc or gcc) to build a program with a RUNPATH")
BASE = 0x400000


def build_elf(
    *,
    bits: int = 64,
    order: str = "<",
    interp: bytes | None = LOADER.encode() + b"\0",
    rpath: str | None = None,
    runpath: str | None = None,
    needed: tuple[str, ...] = (),
    **bad: int,
) -> bytes:
    """A small ELF executable's headers, a PT_LOAD over the whole file, PT_DYNAMIC and PT_INTERP;
    `bad` sets a field to something else: phoff, phnum, phentsize, dyn_filesz, strsz, strtab
    (DT_STRTAB's address)."""
    ehsize, phentsize, dynfmt = (64, 56, "qQ") if bits == 64 else (52, 32, "iI")
    strings, dyn = b"\0", []
    for tag, text in [*((elf.DT_NEEDED, n) for n in needed), (elf.DT_RPATH, rpath), (elf.DT_RUNPATH, runpath)]:
        if text is not None:
            dyn.append((tag, len(strings)))
            strings += text.encode() + b"\0"
    phnum = 2 + (interp is not None)
    interp_at = ehsize + phnum * phentsize
    strings_at = interp_at + len(interp or b"")
    dyn += [
        (elf.DT_STRTAB, bad.get("strtab", BASE + strings_at)),
        (elf.DT_STRSZ, bad.get("strsz", len(strings))),
        (elf.DT_NULL, 0),
    ]
    dynamic = b"".join(struct.pack(order + dynfmt, tag, value) for tag, value in dyn)
    dyn_at = strings_at + len(strings)
    total = dyn_at + len(dynamic)
    segments = [(elf.PT_LOAD, 0, total), (elf.PT_DYNAMIC, dyn_at, bad.get("dyn_filesz", len(dynamic)))]
    if interp is not None:
        segments.append((elf.PT_INTERP, interp_at, len(interp)))
    phdrs = b"".join(
        struct.pack(order + "IIQQQQQQ", kind, 4, at, BASE + at, BASE + at, size, size, 0x1000)
        if bits == 64
        else struct.pack(order + "IIIIIIII", kind, at, BASE + at, BASE + at, size, size, 4, 0x1000)
        for kind, at, size in segments
    )
    ident = b"\x7fELF" + bytes([bits // 32, 1 if order == "<" else 2, 1]) + bytes(9)
    header = struct.pack(
        order + ("HHIQQQIHHHHHH" if bits == 64 else "HHIIIIIHHHHHH"),
        2, 62, 1, BASE, bad.get("phoff", ehsize), 0, 0, ehsize,
        bad.get("phentsize", phentsize), bad.get("phnum", phnum), 0, 0, 0,
    )  # fmt: skip
    return ident + header + phdrs + (interp or b"") + strings + dynamic


def program(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    p.chmod(0o755)
    return p


def directory(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    path.chmod(mode)  # as asked, whatever the umask
    return path


def refused(path: Path | str) -> str:
    with pytest.raises(TrustError) as e:
        check_program(str(path), ME)
    return str(e.value.strerror)


# -- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("order", ["<", ">"])
def test_the_reader_takes_either_class_and_byte_order(tmp_path: Path, bits: int, order: str) -> None:
    data = build_elf(bits=bits, order=order, rpath="/r", runpath="$ORIGIN/lib:/usr/lib", needed=("libc.so.6", "/x.so"))
    found = elf.read(str(program(tmp_path, "p", data)))
    assert found == elf.Elf(LOADER, ("/r",), ("$ORIGIN/lib:/usr/lib",), ("libc.so.6", "/x.so"), ())


def test_the_reader_reads_system_programs_and_passes_over_other_files() -> None:
    found = elf.read(os.path.realpath(sys.executable))
    assert found is not None and found.interp is not None and os.path.isfile(found.interp), found
    assert elf.read("/etc/passwd") is None
    assert elf.read(__file__) is None


@needs_cc
def test_the_reader_reads_what_the_linker_writes(tmp_path: Path) -> None:
    (tmp_path / "p.c").write_text("int main(void) { return 0; }\n")
    for flag, field in (("--enable-new-dtags", "runpath"), ("--disable-new-dtags", "rpath")):
        out = tmp_path / field
        cc = [str(CC), "-o", str(out), str(tmp_path / "p.c"), "-Wl,-rpath,/opt/a:$ORIGIN/../lib", f"-Wl,{flag}"]
        subprocess.run(cc, check=True, capture_output=True, timeout=60)
        found = elf.read(str(out))
        assert found is not None and getattr(found, field) == ("/opt/a:$ORIGIN/../lib",), found
        assert found.interp and os.path.isfile(found.interp) and "libc.so.6" in found.needed


MALFORMED: dict[str, Callable[[int], bytes]] = {
    "cut in its identification": lambda bits: b"\x7fELF\x02",
    "of no known class": lambda bits: b"\x7fELF\x03" + build_elf(bits=bits)[5:],
    "cut in its ELF header": lambda bits: build_elf(bits=bits)[:40],
    "cut in its program headers": lambda bits: build_elf(bits=bits)[:100],
    "program headers past the end": lambda bits: build_elf(bits=bits, phoff=10**6),
    "a huge count of program headers": lambda bits: build_elf(bits=bits, phnum=0xFFFE),
    "extended numbering": lambda bits: build_elf(bits=bits, phnum=0xFFFF),
    "program headers of a wrong size": lambda bits: build_elf(bits=bits, phentsize=40),
    "a dynamic section past the end": lambda bits: build_elf(bits=bits, dyn_filesz=10**5),
    "a huge dynamic section": lambda bits: build_elf(bits=bits, dyn_filesz=2**31),
    "a string table in no segment": lambda bits: build_elf(bits=bits, runpath="/x", strtab=2**31),
    "a string past its string table": lambda bits: build_elf(bits=bits, runpath="/x", strsz=1),
    "a string without its end": lambda bits: build_elf(bits=bits, runpath="/x", strsz=3),
    "a PT_INTERP without its end": lambda bits: build_elf(bits=bits, interp=b"/bin/sh"),
    "an empty PT_INTERP": lambda bits: build_elf(bits=bits, interp=b"\0\0"),
}


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_elf_file_is_refused_cleanly(tmp_path: Path, case: str, bits: int) -> None:
    """Cut short, offsets past its end, counts and sizes past any real file's: refused by name, no
    other exception, nothing read past the bounds."""
    p = program(tmp_path, "bad", MALFORMED[case](bits))
    with pytest.raises(elf.ElfError):
        elf.read(str(p))
    assert f"{p}: a malformed ELF file" in refused(p)


# -- checking ----------------------------------------------------------------------------------


def test_system_programs_pass() -> None:
    for path in ("/bin/true", "/usr/bin/python3", sys.executable, "/usr/bin/env"):
        if os.path.exists(path):
            check_program(path, ME)
            check_program(path, NOBODY)


def test_a_runpath_or_rpath_directory_others_may_write_is_refused_by_name(tmp_path: Path) -> None:
    """A library put in a directory others may write (or in one they may make there) is run as the
    program's user; so is one in a sticky directory, where anyone may add a file."""
    ours = directory(tmp_path / "ours")
    open_dir = directory(tmp_path / "open", 0o777)
    sticky = directory(tmp_path / "sticky", 0o1777)
    builds: list[tuple[str, Callable[[str], bytes]]] = [
        ("RUNPATH", lambda value: build_elf(runpath=value)),
        ("RPATH", lambda value: build_elf(rpath=value)),
    ]
    for tag, build in builds:
        for where in (open_dir, sticky, open_dir / "not-yet", open_dir / "not-yet" / "deeper"):
            prog = program(tmp_path, tag, build(f"{ours}:{where}"))
            why = refused(prog)
            writable = where if where in (open_dir, sticky) else open_dir
            assert f"directory {writable} is writable by others" in why, why
            assert f"a {tag} directory of {prog}" in why, why
        check_program(str(program(tmp_path, tag, build(f"{ours}:{ours}/not-yet:/usr/lib"))), ME)


@needs_root
def test_a_runpath_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = directory(tmp_path / "theirs")
    os.chown(theirs, NOBODY, NOBODY)
    prog = program(tmp_path, "prog", build_elf(runpath=str(theirs)))
    assert f"directory {theirs} belongs to uid {NOBODY}" in refused(prog)
    prog = program(tmp_path, "prog", build_elf(runpath=f"{theirs}/lib"))  # not there: theirs to make
    assert f"directory {theirs} belongs to uid {NOBODY}" in refused(prog)
    check_program(str(prog), NOBODY)  # run as that user: its own directory is fine


@needs_cc
def test_a_program_built_with_a_runpath_others_may_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.c").write_text("int main(void) { return 0; }\n")
    open_dir = directory(tmp_path / "open", 0o777)
    ours = directory(tmp_path / "ours")
    for name, runpath in (("bad", open_dir), ("good", ours)):
        cc = [str(CC), "-o", str(tmp_path / name), str(tmp_path / "p.c"), f"-Wl,-rpath,{runpath}"]
        subprocess.run([*cc, "-Wl,--enable-new-dtags"], check=True, capture_output=True, timeout=60)
    assert f"directory {open_dir} is writable by others" in refused(tmp_path / "bad")
    check_program(str(tmp_path / "good"), ME)
    subprocess.run([str(tmp_path / "good")], check=True, timeout=30)  # and it runs


def test_origin_is_the_directory_of_the_program_as_resolved(tmp_path: Path) -> None:
    """$ORIGIN and ${ORIGIN} are the directory of the program's real path (as /proc/self/exe), not of
    a link to it."""
    real = directory(tmp_path / "real")
    directory(real / "lib", 0o777)
    directory(real / "ok")
    links = directory(tmp_path / "links")
    directory(links / "lib")
    for runpath in ("$ORIGIN/lib", "${ORIGIN}/lib", "/usr/lib:$ORIGIN/../real/lib"):
        program(real, "prog", build_elf(runpath=runpath))
        (links / "prog").unlink(missing_ok=True)
        (links / "prog").symlink_to(real / "prog")
        assert f"directory {real / 'lib'} is writable by others" in refused(links / "prog")
    program(real, "prog", build_elf(runpath="$ORIGIN/ok:${ORIGIN}/missing:$ORIGIN"))
    check_program(str(links / "prog"), ME)


def test_lib_and_platform_are_checked_for_each_value_and_where_it_is_chosen(tmp_path: Path) -> None:
    d = directory(tmp_path / "d")
    for sub in ("lib", "lib64", "lib32"):
        directory(d / sub)
    check_program(str(program(tmp_path, "prog", build_elf(runpath=f"{d}/$LIB:{d}/lib/${{PLATFORM}}/x"))), ME)
    (d / "lib64").chmod(0o777)
    assert f"directory {d / 'lib64'} is writable by others" in refused(
        program(tmp_path, "prog", build_elf(runpath=f"{d}/$LIB"))
    )
    (d / "lib64").chmod(0o755)
    (d / "lib").chmod(0o777)  # where a $PLATFORM not listed could be made
    assert f"directory {d / 'lib'} is writable by others" in refused(
        program(tmp_path, "prog", build_elf(runpath=f"{d}/lib/$PLATFORM"))
    )


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("/usr/lib::/lib", "an empty entry is relative to the working directory"),
        (":/usr/lib", "an empty entry is relative"),
        ("lib", "'lib' is relative to the working directory"),
        ("$LIB/x", "'$LIB/x' is relative"),
        ("$FOO/lib", "'$FOO/lib' holds a $ the loaders do not read alike"),
        ("$ORIGINX", "holds a $ the loaders do not read alike"),
        ("${ORIGIN", "holds a $ the loaders do not read alike"),
        ("/$LIB/$LIB/$LIB/$LIB/$LIB", "more than 4 tokens"),
    ],
)
def test_entries_that_mean_the_working_directory_or_an_unknown_token_are_refused(
    tmp_path: Path, entry: str, why: str
) -> None:
    """An empty or relative entry is the working directory when the loader uses it: / at the start,
    but the program may change it before a dlopen. An unknown $NAME is read apart by the loaders."""
    assert why in refused(program(tmp_path, "prog", build_elf(runpath=entry)))


def test_an_empty_runpath_is_no_entry(tmp_path: Path) -> None:
    check_program(str(program(tmp_path, "prog", build_elf(runpath="", rpath=""))), ME)


def test_the_elf_interpreter_and_a_library_named_by_path_are_checked_as_the_program(tmp_path: Path) -> None:
    open_dir = directory(tmp_path / "open", 0o777)
    loader = open_dir / "ld.so"
    loader.write_bytes(b"")
    prog = program(tmp_path, "prog", build_elf(interp=str(loader).encode() + b"\0"))
    why = refused(prog)
    assert f"directory {open_dir} is writable by others" in why and f"the ELF interpreter of {prog}" in why, why
    ours = directory(tmp_path / "ours")
    (ours / "libx.so").write_bytes(b"")
    for library in (open_dir / "libx.so", open_dir / "missing.so"):
        prog = program(tmp_path, "prog", build_elf(needed=("libc.so.6", str(library))))
        why = refused(prog)
        assert f"directory {open_dir} is writable by others" in why and f"a library {prog} loads by path" in why, why
    (ours / "libx.so").chmod(0o666)
    prog = program(tmp_path, "prog", build_elf(needed=(f"{ours}/libx.so",)))
    assert f"{ours / 'libx.so'} is writable by others" in refused(prog)
    (ours / "libx.so").chmod(0o644)
    check_program(str(prog), ME)
    check_program(str(program(tmp_path, "prog", build_elf(interp=None))), ME)  # static: no loader


def test_an_elf_interpreter_of_a_script_is_checked_as_the_program(tmp_path: Path) -> None:
    open_dir = directory(tmp_path / "open", 0o777)
    interp = program(tmp_path, "interp", build_elf(runpath=str(open_dir)))
    script = tmp_path / "script"
    script.write_text(f"#!{interp}\n")
    script.chmod(0o755)
    why = refused(script)
    assert f"directory {open_dir} is writable by others" in why and f"the interpreter of {script}" in why, why
