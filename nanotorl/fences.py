"""Code fences as Markdown reads them, and where a tool call fires: the reference on text (:func:`blocks`,
:func:`tool_call`) beside the incremental scanner the generator runs on each new token's bytes (:class:`Scanner`).

The rules are CommonMark's fenced code blocks (spec 0.31.2, section 4.5), read line by line:

- A line ends at "\\n"; a "\\r" just before it is part of the line end (CRLF). A lone "\\r" is an ordinary
  character. A line is read once its line end is written: a last line without one may still go on, so it opens
  and closes nothing yet (the generator cannot know "```" is a closing line before the model ends the line).
- A fence line is up to 3 spaces, then a run of at least 3 backticks or at least 3 tildes (the fence), then the
  info string, trimmed of spaces and tabs; after a backtick fence the info string holds no backtick
  (```` ```python``` ```` at the start of a line is inline code, i.e. text). Its language is the first word of the
  info string, lowercased.
- Outside a block, a fence line opens one. Inside it, a line closes it if it is a fence line of the same
  character, at least as long as the opening fence, with nothing after it but spaces and tabs. Every other line
  is the block's content, fence lines with an info string included; up to as many leading spaces as the
  opening fence had are removed from each content line (so an indented block's code is not indented).
- So these are text, not fences: a fence after other text on its line (prose that mentions a ```python block),
  after 4 or more spaces or a tab (CommonMark reads an indented code block), and backticks inside the code
  (``print("```")``, a comment) unless they make a closing line. Block quotes, list items and HTML blocks are
  not parsed: a fence after "> " or "- " is text (a model's reasoning is not a nested document).

What the tool runs (ToRL's protocol, the ```python the prompt asks for):

- A python block is a backtick block whose language is ``python``, ``py`` or ``python3``, in any case
  (```` ```Python ````): what base and instruct models write for Python. ``~~~`` blocks are never run (the
  protocol is backticks, like the ```output block that answers), but they are blocks: a ```python line inside a
  ``~~~`` block is its content.
- trigger 'fence': a call fires at the line end of the closing line of the first python block, and runs its
  code.
- trigger 'output' (ToRL's original stop string): a call fires at the line end of an opening line whose
  language is ``output`` (```output, outside any block), if a python block was closed before it, and runs the
  last such block (as ToRL does). The model's own ```output line stays policy text; the observation follows.
  A ```output line inside a python block that was not closed is code (ToRL's models close the block first).
- The observation is a whole ```output block, so the policy text after it starts on a new line outside any
  block: each stretch of policy text between observations is read on its own (a block already run is not run
  again).
"""
import re
from dataclasses import dataclass

PYTHON = ("python", "py", "python3")
_FENCE_LINE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)", re.S)


@dataclass(frozen=True)
class Fence:
    """A fence line: its indentation (spaces), its fence ("```", "~~~~", ...) and its info string (trimmed)."""
    indent: int
    fence: str
    info: str

    @property
    def lang(self) -> str:
        return self.info.split(maxsplit=1)[0].lower() if self.info else ""

    @property
    def runs(self) -> bool:
        """Does a block opened by this line hold code for the tool (a backtick python block)?"""
        return self.fence[0] == "`" and self.lang in PYTHON

    @property
    def output(self) -> bool:
        """Is it ToRL's ```output opening line?"""
        return self.fence[0] == "`" and self.lang == "output"

    def closes(self, opening: "Fence") -> bool:
        return not self.info and self.fence[0] == opening.fence[0] and len(self.fence) >= len(opening.fence)


def fence_line(line: str) -> Fence | None:
    """The fence of one line (without its line end), or None if the line is not a fence line."""
    m = _FENCE_LINE.fullmatch(line)
    if m is None:
        return None
    indent, fence, info = m.groups()
    if fence[0] == "`" and "`" in info:
        return None
    return Fence(len(indent), fence, info.strip(" \t"))


def dedent(code: str, indent: int) -> str:
    """``code`` with up to ``indent`` leading spaces removed from each line."""
    return re.sub(rf"(?m)^ {{1,{indent}}}", "", code) if indent else code


# --------------------------------------------------------------------------------------------------- reference

@dataclass(frozen=True)
class Block:
    """A fenced block: where its opening line starts, where its content starts (just past the opening line's line
    end), just past its closing line's line end (None while it is open), its opening fence line and its code (the
    content, dedented)."""
    start: int
    body: int
    end: int | None
    opening: Fence
    code: str


@dataclass(frozen=True)
class Call:
    """A tool call: ``end`` is the offset just past the line end where it fires; ``code`` is what it runs."""
    end: int
    code: str


def blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, in order (module docstring); the last one may be open."""
    found, opening, start, body, content = [], None, 0, 0, []
    pos = 0
    for line_end in re.finditer("\n", text):
        line, nxt = text[pos:line_end.start()].removesuffix("\r"), line_end.end()
        fence = fence_line(line)
        if opening is None:
            if fence is not None:
                opening, start, body, content = fence, pos, nxt, []
        elif fence is not None and fence.closes(opening):
            found.append(Block(start, body, nxt, opening, dedent("".join(content), opening.indent)))
            opening = None
        else:
            content.append(text[pos:nxt])
        pos = nxt
    if opening is not None:
        found.append(Block(start, body, None, opening, dedent("".join(content), opening.indent)))
    return found


def tool_call(text: str, trigger: str) -> Call | None:
    """The first tool call in a stretch of policy text (module docstring), or None."""
    last = None  # the last closed python block
    for block in blocks(text):
        if block.opening.runs and block.end is not None:
            if trigger == "fence":
                return Call(block.end, block.code)
            last = block
        elif trigger == "output" and block.opening.output and last is not None:
            return Call(block.body, last.code)
    return None


# ----------------------------------------------------------------------------------------- incremental scanner


def line_ends(tokenizer) -> list[bool]:
    """For every token id of ``tokenizer``: do its bytes hold a line end? A call fires only at the end of a line,
    so only after such a token is there anything to check."""
    return [b"\n" in tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


class Scanner:
    """Reads one response's policy text as it is sampled: :meth:`feed` takes each new token's bytes (a token may
    hold part of a UTF-8 character) and returns the code to run when a tool call fires, where :func:`tool_call`
    on the text so far fires. :meth:`reset` starts a new stretch of policy text (after an observation).

    State: the current line's bytes while it may still become a fence line (at most 3 spaces, then a prefix of a
    fence), the open block's fence, and the bytes of an open python block. A token that holds no line end, in a
    line that can no longer be a fence line, costs one test (plus a copy inside a python block); a line is
    classified (:func:`fence_line`) only at its line end, and only if it may be a fence line."""

    __slots__ = ("trigger", "line", "live", "opening", "body", "last")

    def __init__(self, trigger: str):
        self.trigger = trigger
        self.reset()

    def reset(self):
        self.line = bytearray()  # the current line so far, while it may be a fence line (``live``)
        self.live = True
        self.opening = None      # the open block's Fence
        self.body = None         # the open python block's bytes since its opening line, line ends included
        self.last = None         # 'output' trigger: the code of the last closed python block

    def feed(self, data: bytes) -> str | None:
        if not self.live and b"\n" not in data:  # the hot path: mid-line of a line that is no fence line
            if self.body is not None:
                self.body += data
            return None
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            if self.body is not None:
                self.body += piece if nl < 0 else data[start:nl + 1]
            if self.live:
                self.line += piece
                rest = self.line.lstrip(b" ")
                head = bytes(rest[:3])
                self.live = len(self.line) - len(rest) <= 3 and (b"```".startswith(head) or b"~~~".startswith(head))
            if nl < 0:
                return None
            code = self._line_end()
            if code is not None:
                return code
            start = nl + 1

    def _line_end(self) -> str | None:
        """The current line has ended: open or close a block; the code to run if a call fires."""
        fence = fence_line(self.line.decode("utf-8", "replace").removesuffix("\r")) if self.live else None
        closing = len(self.line) + 1  # the line's bytes and its "\n", the tail of ``body`` if it closes a block
        self.line, self.live = bytearray(), True
        if fence is None:
            return None
        if self.opening is None:
            self.opening, self.body = fence, bytearray() if fence.runs else None
            if self.trigger == "output" and fence.output:
                return self.last
            return None
        if not fence.closes(self.opening):
            return None
        code = None
        if self.body is not None:
            code = dedent(self.body[:-closing].decode("utf-8", "replace"), self.opening.indent)
        self.opening, self.body = None, None
        if code is not None and self.trigger == "output":
            self.last, code = code, None
        return code
