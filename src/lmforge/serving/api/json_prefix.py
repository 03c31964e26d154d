"""How much of a growing text is a valid beginning of one JSON object, and where that object ends.

A streamed tool call's arguments go out as the model writes them (``tool_parsers.py``), so after
every piece of output the server must know which characters may be sent: those that begin a JSON
object some continuation could complete. :class:`JsonPrefix` reads characters one at a time (a
pushdown automaton of RFC 8259's grammar, numbers and escapes included) and stops at the first
character no JSON text could have there, or just after the object's closing brace. Everything it
has read is then a prefix of valid JSON; whether the model completes it is the model's affair (a
reply cut by ``max_tokens`` ends mid-object, as OpenAI's do).
"""

from __future__ import annotations

_WS = " \t\n\r"
_ESCAPES = '"\\/bfnrt'
_HEX = "0123456789abcdefABCDEF"
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# A number's states: what each character class leads to. A number may end only in _NUMBER_ENDS.
_NUMBER = {
    "sign": {"0": "zero", "1": "int"},
    "zero": {".": "dot", "e": "exp"},
    "int": {"0": "int", "1": "int", ".": "dot", "e": "exp"},
    "dot": {"0": "frac", "1": "frac"},
    "frac": {"0": "frac", "1": "frac", "e": "exp"},
    "exp": {"+": "exp_sign", "0": "exp_digits", "1": "exp_digits"},
    "exp_sign": {"0": "exp_digits", "1": "exp_digits"},
    "exp_digits": {"0": "exp_digits", "1": "exp_digits"},
}
_NUMBER_ENDS = {"zero", "int", "frac", "exp_digits"}


def _number_class(ch: str) -> str | None:
    if ch == "0":
        return "0"
    if "1" <= ch <= "9":
        return "1"
    return {".": ".", "e": "e", "E": "e", "+": "+", "-": "+"}.get(ch)


class JsonPrefix:
    """Reads one JSON object character by character: :attr:`read` characters so far are a valid
    beginning of one; :attr:`done` once its closing brace was read, :attr:`failed` once a character
    could not follow (it is not counted in :attr:`read`)."""

    def __init__(self) -> None:
        self.read = 0
        self.done = False
        self.failed = False
        self._state = "start"
        self._stack: list[str] = []  # the open containers, "{" or "["
        self._key = False  # the string being read is an object's key
        self._left = ""  # a literal's characters still to come
        self._hex = 0  # hex digits still to come in a \\u escape
        self._number = ""

    def feed(self, text: str) -> int:
        """Read ``text``; how many of its characters were read (fewer than all once the object
        ended or a character was refused)."""
        for i, ch in enumerate(text):
            if self.done or self.failed:
                return i
            if not self._step(ch):
                self.failed = True
                return i
            self.read += 1
        return len(text)

    def _step(self, ch: str) -> bool:
        state = self._state
        if state == "string":
            if ch == '"':
                self._state = "colon" if self._key else self._ended()
            elif ch == "\\":
                self._state = "escape"
            return ch >= " "  # control characters must be escaped inside a string
        if state == "escape":
            self._state, self._hex = ("hex", 4) if ch == "u" else ("string", 0)
            return ch == "u" or ch in _ESCAPES
        if state == "hex":
            self._hex -= 1
            self._state = "hex" if self._hex else "string"
            return ch in _HEX
        if state == "literal":
            if ch != self._left[0]:
                return False
            self._left = self._left[1:]
            self._state = "literal" if self._left else self._ended()
            return True
        if state == "number":
            nxt = _NUMBER[self._number].get(_number_class(ch) or "")
            if nxt is not None:
                self._number = nxt
                return True
            if self._number not in _NUMBER_ENDS:
                return False
            self._state = self._ended()  # the character after a number is read as what follows a value
            return self._step(ch)
        if ch in _WS:
            return state != "done"
        return self._token(state, ch)

    def _token(self, state: str, ch: str) -> bool:
        """A structural character or a value's first character, in ``state``."""
        if state == "start":
            return ch == "{" and self._open(ch)
        if state in ("first_key", "key"):
            if state == "first_key" and ch == "}":
                return self._close()
            self._state, self._key = "string", True
            return ch == '"'
        if state == "colon":
            self._state = "value"
            return ch == ":"
        if state == "after":
            top = self._stack[-1]
            if ch == ",":
                self._state = "key" if top == "{" else "value"
                return True
            return ch == ("}" if top == "{" else "]") and self._close()
        if state in ("value", "first_value"):
            if state == "first_value" and ch == "]":
                return self._close()
            return self._value(ch)
        return False  # done: nothing follows the object

    def _value(self, ch: str) -> bool:
        if ch in "{[":
            return self._open(ch)
        if ch == '"':
            self._state, self._key = "string", False
        elif ch in _LITERALS:
            self._state, self._left = "literal", _LITERALS[ch]
        elif ch == "-" or "0" <= ch <= "9":
            self._state, self._number = "number", "sign" if ch == "-" else "zero" if ch == "0" else "int"
        else:
            return False
        return True

    def _open(self, ch: str) -> bool:
        self._stack.append(ch)
        self._state = "first_key" if ch == "{" else "first_value"
        return True

    def _close(self) -> bool:
        self._stack.pop()
        self._state = self._ended()
        return True

    def _ended(self) -> str:
        """The state after a whole value: what follows it in its container, or the end of the object."""
        if self._stack:
            return "after"
        self.done = True
        return "done"
