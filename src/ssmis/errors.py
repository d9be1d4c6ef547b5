"""User-facing errors: one line saying where, what is wrong and what to do; the CLI exits 2 on them."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad path, config key, data).

    Printed by the CLI as ``ssmis: error: <where>: <what>. <todo>`` without a traceback.
    """

    def __init__(self, where: str | None, what: str, todo: str = ""):
        self.where, self.what, self.todo = where, what.rstrip("."), todo
        super().__init__(str(self))

    def __reduce__(self):                 # picklable, so a rank can hand its error to the others
        return (type(self), (self.where, self.what, self.todo))

    def __str__(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}. {self.todo}".rstrip() if self.todo else f"{head}."
