"""Recipient import from a CSV file: all or nothing.

The file needs a header line with an `email` column (any case); every other column becomes a
merge field, stored in `Recipient.merge_data` as {column name: value}. Lines are numbered as a
spreadsheet numbers its rows: the header is line 1.

One pass over the file checks every row, and the valid rows stream into the database inside the
import's transaction (COPY on PostgreSQL, `bulk_create` in chunks elsewhere), so only the set of
addresses seen is held in memory. If any row is bad the transaction rolls back and
`ImportRejected` lists the problems: nothing is written.

Duplicates (letter case ignored) of an earlier line or of a recipient already on the message are
skipped and reported, not rejected.

One module for one concept: checking a row and writing it are one pass over the file, which
reads worse split across modules than kept together (a little over 400 lines).
"""

import csv
import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import IO

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, connection, transaction
from django.template.defaultfilters import filesizeformat

from .models import Message, Recipient

logger = logging.getLogger(__name__)

EMAIL_COLUMN = "email"
EMAIL_MAX_LENGTH = 254
MAX_LISTED_ERRORS = 100
BULK_CREATE_CHUNK = 2_000
UNIQUE_EMAIL_INDEX = "recipient_unique_message_email"

# A strict subset of what Django's EmailValidator accepts (an ASCII dot-atom local part, an ASCII
# host name with a letters-only TLD). Nearly every real address matches it and skips the
# validator, which costs several times more; anything else goes to the validator, which decides.
_PLAIN_EMAIL = re.compile(
    r"[-!#$%&'*+/=?^_`{}|~0-9A-Za-z]+(?:\.[-!#$%&'*+/=?^_`{}|~0-9A-Za-z]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*"
    r"\.(?!-)[A-Za-z-]{2,63}(?<!-)"
)

Row = tuple[int, str, list[str]]  # line, email, merge values in the order of the header


class ImportRejected(Exception):
    """Nothing was imported. `errors` lists the problems, at most MAX_LISTED_ERRORS of them."""

    def __init__(self, errors: list[str], *, error_count: int | None = None):
        self.errors = errors
        self.error_count = len(errors) if error_count is None else error_count
        super().__init__(errors[0] if self.error_count == 1 else f"{self.error_count} problems")

    @property
    def unlisted_count(self) -> int:
        return self.error_count - len(self.errors)


@dataclass(frozen=True)
class ImportResult:
    imported: int
    # Lines skipped because their address is already on the message or on an earlier line.
    duplicate_lines: tuple[int, ...]

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_lines)


def is_valid_email(value: str) -> bool:
    if len(value) > EMAIL_MAX_LENGTH:
        return False
    if _PLAIN_EMAIL.fullmatch(value):
        return True
    try:
        validate_email(value)
    except ValidationError:
        return False
    return True


@transaction.atomic
def import_recipients(*, message: Message, file: IO[bytes], user=None) -> ImportResult:
    """Add the recipients listed in a CSV file to a message, or raise ImportRejected.

    `file` is a binary file-like object, such as a Django UploadedFile.
    """
    # The row lock serializes imports into one message and holds off a start until we commit.
    locked = Message.objects.select_for_update().only("id", "status").get(pk=message.pk)
    if locked.is_content_frozen:
        raise ImportRejected(
            [
                "Recipients can only be added to a draft or scheduled message; this one is "
                f"{locked.get_status_display().lower()}, and its content is frozen."
            ]
        )
    _check_size(file)

    if connection.vendor != "postgresql":
        scan, imported, skipped = _scan_and_load(locked, file, _bulk_create)
    else:
        try:
            with transaction.atomic(), connection.wrap_database_errors:
                scan, imported, skipped = _scan_and_load(locked, file, _copy)
        except IntegrityError as exc:
            if getattr(getattr(exc.__cause__, "diag", None), "constraint_name", "") != (
                UNIQUE_EMAIL_INDEX
            ):
                raise
            # PostgreSQL's lower() folded together two addresses that Python's keeps apart: a
            # few non-ASCII letters, depending on the database's locale. Rare; load again the
            # slower way, which lets the unique index decide what is a duplicate.
            scan, imported, skipped = _scan_and_load(locked, file, _copy_skipping_duplicates)

    if scan.error_count:
        raise ImportRejected(scan.errors, error_count=scan.error_count)
    if scan.data_lines == 0:
        raise ImportRejected(["The file has a header line but no recipients."])

    result = ImportResult(
        imported=imported,
        duplicate_lines=tuple(sorted(scan.duplicate_lines + skipped)),
    )
    logger.info(
        "%s imported %d recipients into message %s, skipped %d duplicates",
        user or "someone",
        result.imported,
        locked.pk,
        result.duplicates,
    )
    return result


def _check_size(file: IO[bytes]) -> None:
    size = getattr(file, "size", None)
    if size is None:
        size = file.seek(0, io.SEEK_END)
    limit = settings.RECIPIENT_IMPORT_MAX_BYTES
    if size > limit:
        raise ImportRejected(
            [
                f"The file is {filesizeformat(size)}; the largest accepted is "
                f"{filesizeformat(limit)}. Split it and import each part."
            ]
        )
    if size == 0:
        raise ImportRejected(["The file is empty."])
    file.seek(0)


@dataclass
class _Scan:
    """One pass over the file: reads the header, yields the rows to load, collects problems."""

    file: IO[bytes]
    seen: set[str] = field(default_factory=set)  # lower-cased addresses
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    duplicate_lines: list[int] = field(default_factory=list)
    data_lines: int = 0
    header: list[str] = field(default_factory=list)
    header_line: int = 0

    def error(self, line: int, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append(f"Line {line}: {text}")

    @property
    def merge_fields(self) -> list[str]:
        return [name for name in self.header if name.lower() != EMAIL_COLUMN]

    def start(self, text: Iterable[str]) -> Iterator[Row]:
        """Reads and checks the header; returns the rows that follow it."""
        rows = csv.reader(text, strict=True)
        try:
            self.header_line, self.header = self._header(rows)
        except UnicodeDecodeError as exc:
            raise ImportRejected([self._not_utf8()]) from exc
        return self._decoded(rows)

    def _decoded(self, rows: Iterator[list[str]]) -> Iterator[Row]:
        try:
            yield from self._valid_rows(rows)
        except UnicodeDecodeError as exc:
            raise ImportRejected([self._not_utf8()]) from exc

    def _valid_rows(self, rows: Iterator[list[str]]) -> Iterator[Row]:
        """Each new, valid row; none after the first problem, though checking goes on."""
        header_line = line = self.header_line
        width = len(self.header)
        email_at = next(i for i, name in enumerate(self.header) if name.lower() == EMAIL_COLUMN)
        merge_at = [i for i in range(width) if i != email_at]
        seen, duplicate_lines = self.seen, self.duplicate_lines
        plain_email = _PLAIN_EMAIL.fullmatch
        # The import's hot path: locals, and the cheap checks first.
        try:
            for line, row in enumerate(rows, start=header_line + 1):
                if len(row) != width:
                    if not "".join(row).strip():
                        continue  # a blank line
                    if len(row) > width:
                        self.data_lines += 1
                        self.error(
                            line,
                            f"{len(row)} values, but the header names "
                            f"{width} column{'s' if width > 1 else ''}. "
                            "A value that contains a comma must be in double quotes.",
                        )
                        continue
                    # Values missing at the end of a line are empty.
                    row = row + [""] * (width - len(row))
                email = row[email_at].strip()
                if not email:
                    if "".join(row).strip():
                        self.data_lines += 1
                        self.error(line, "no email address.")
                    continue  # a blank line
                self.data_lines += 1
                if len(email) > EMAIL_MAX_LENGTH:
                    self.error(line, f"the address is longer than {EMAIL_MAX_LENGTH} characters.")
                    continue
                if not plain_email(email) and not is_valid_email(email):
                    self.error(line, f"“{email}” is not a valid email address.")
                    continue
                if "\x00" in "".join(row):
                    # PostgreSQL cannot store it; in a CSV it means a binary or UTF-16 file.
                    self.error(line, "contains a NUL character: is this a text file?")
                    continue
                key = email.lower()
                if key in seen:
                    duplicate_lines.append(line)
                    continue
                seen.add(key)
                if self.error_count:
                    continue  # rejected already: keep checking, stop loading
                yield line, email, [row[i].strip() for i in merge_at]
        except csv.Error as exc:
            self.error(line + 1, f"the CSV is malformed ({exc}). Check the double quotes.")

    def _header(self, rows: Iterator[list[str]]) -> tuple[int, list[str]]:
        line, header = 0, []
        try:
            for line, row in enumerate(rows, start=1):  # noqa: B007 (used after the loop)
                header = [name.strip() for name in row]
                if any(header):
                    break
        except csv.Error as exc:
            raise ImportRejected(
                [f"Line {line + 1}: the CSV is malformed ({exc}). Check the double quotes."]
            ) from exc
        if not any(header):
            raise ImportRejected(["The file is empty."])
        if any("\x00" in name for name in header):
            raise ImportRejected([f"Line {line}: contains a NUL character: is this a text file?"])

        found = ", ".join(f"“{name}”" for name in header)
        email_columns = [name for name in header if name.lower() == EMAIL_COLUMN]
        if not email_columns:
            problem = (
                f"Line {line} must name the columns, one of them “{EMAIL_COLUMN}”; "
                f"the columns found are {found}."
            )
            if any("@" in name for name in header):
                problem += " The file seems to have no header line: add one, e.g. email,first_name."
            elif any(";" in name or "\t" in name for name in header):
                problem += " The columns seem to be separated by “;” or tabs: use commas."
            raise ImportRejected([problem])
        problems = []
        if len(email_columns) > 1:
            problems.append(f"The header has more than one “{EMAIL_COLUMN}” column: {found}.")
        problems.extend(
            f"Column {number} of the header has no name: name it (it becomes a merge field) or "
            "delete the column."
            for number, name in enumerate(header, start=1)
            if not name
        )
        repeated = sorted({name for name in header if name and header.count(name) > 1})
        problems.extend(
            f"The header names the column “{name}” more than once." for name in repeated
        )
        if problems:
            raise ImportRejected(problems)
        return line, header

    def _not_utf8(self) -> str:
        # The text layer decodes ahead in chunks, so read the raw lines again to say where.
        self.file.seek(0)
        where = ""
        for number, raw in enumerate(self.file, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                where = f" (line {number} is not)"
                break
        return (
            f"The file is not UTF-8 text{where}. Save it as “CSV UTF-8” (in Excel: "
            "File > Save As > CSV UTF-8) and import it again."
        )


Loader = Callable[[Message, list[str], Iterable[Row]], tuple[int, list[int]]]


def _scan_and_load(message: Message, file: IO[bytes], load: Loader) -> tuple[_Scan, int, list[int]]:
    """Returns the scan, the rows inserted and the lines the database skipped as duplicates."""
    scan = _Scan(file=file)
    scan.seen.update(
        email.lower()
        for email in Recipient.objects.filter(message=message)
        .values_list("email", flat=True)
        .iterator()
    )
    file.seek(0)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    try:
        rows = scan.start(text)
        imported, skipped = load(message, scan.merge_fields, rows)
    finally:
        text.detach()  # closing the wrapper would close the caller's file
    return scan, imported, skipped


def _bulk_create(message: Message, fields: list[str], rows: Iterable[Row]) -> tuple[int, list[int]]:
    """The embedded default, SQLite, whose lower() folds ASCII only: the scan's check is enough."""
    imported = 0
    chunk: list[Recipient] = []
    for _line, email, values in rows:
        merge_data = dict(zip(fields, values, strict=True))
        chunk.append(Recipient(message_id=message.pk, email=email, merge_data=merge_data))
        if len(chunk) == BULK_CREATE_CHUNK:
            Recipient.objects.bulk_create(chunk)
            imported += len(chunk)
            chunk = []
    if chunk:
        Recipient.objects.bulk_create(chunk)
        imported += len(chunk)
    return imported, []


def _copy(message: Message, fields: list[str], rows: Iterable[Row]) -> tuple[int, list[int]]:
    """COPY straight into the recipients table.

    PostgreSQL updates the indexes while Python is still reading the file, so on two cores the
    two halves of the work overlap.
    """
    columns, values = _other_columns(message)
    quote = connection.ops.quote_name
    columns += [quote(_column("email")), quote(_column("merge_data"))]
    values = tuple(values)
    encode = _json_object_encoder(fields)
    copied = 0
    with (
        connection.cursor() as cursor,
        cursor.copy(
            f"COPY {quote(Recipient._meta.db_table)} ({', '.join(columns)}) FROM STDIN"
        ) as copy,
    ):
        for _line, email, merge_values in rows:
            copy.write_row((*values, email, encode(merge_values)))
            copied += 1
    return copied, []


def _copy_skipping_duplicates(
    message: Message, fields: list[str], rows: Iterable[Row]
) -> tuple[int, list[int]]:
    """COPY into a temporary table, then INSERT … SELECT in file order, ON CONFLICT DO NOTHING.

    The rows the unique index turns away are reported as duplicates.
    """
    quote = connection.ops.quote_name
    table = quote(Recipient._meta.db_table)
    message_column, email_column = quote(_column("message")), quote(_column("email"))
    columns, params = _other_columns(message)
    encode = _json_object_encoder(fields)
    copied = 0
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMPORARY TABLE recipient_import"
            " (line integer NOT NULL, email text NOT NULL, merge_data jsonb NOT NULL)"
            " ON COMMIT DROP"
        )
        with cursor.copy("COPY recipient_import (line, email, merge_data) FROM STDIN") as copy:
            for line, email, merge_values in rows:
                copy.write_row((line, email, encode(merge_values)))
                copied += 1
        casts = [f"CAST(%s AS {f.cast_db_type(connection)})" for f in _other_fields()]
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}, {email_column}, "  # noqa: S608
            f"{quote(_column('merge_data'))})"
            f" SELECT {', '.join(casts)}, email, merge_data FROM recipient_import ORDER BY line"
            f" ON CONFLICT ({message_column}, lower({email_column})) DO NOTHING",
            params,
        )
        inserted = cursor.rowcount
        # The addresses in recipient_import differ even in case, so the skipped rows are those
        # whose exact address did not arrive.
        cursor.execute(
            "SELECT line FROM recipient_import AS i WHERE NOT EXISTS ("  # noqa: S608
            f" SELECT 1 FROM {table} AS r WHERE r.{message_column} = %s"
            f" AND lower(r.{email_column}) = lower(i.email) AND r.{email_column} = i.email)",
            [message.pk],
        )
        skipped = [line for (line,) in cursor.fetchall()]
        cursor.execute("DROP TABLE recipient_import")
    return inserted, skipped


def _json_object_encoder(fields: list[str]) -> Callable[[list[str]], str]:
    """Encodes a row's merge values as the JSON object {field: value}.

    About twice as fast as json.dumps, which builds an encoder per call; the strings are
    escaped by the function json.dumps itself uses (in C).
    """
    keys = [encode_basestring(name) + ":" for name in fields]

    def encode(values: list[str]) -> str:
        pairs = [key + encode_basestring(value) for key, value in zip(keys, values, strict=True)]
        return "{" + ",".join(pairs) + "}"

    return encode


def _column(name: str) -> str:
    return Recipient._meta.get_field(name).column


def _other_fields() -> list:
    return [
        f
        for f in Recipient._meta.concrete_fields
        if not (f.primary_key or f.generated or f.name in ("email", "merge_data"))
    ]


def _other_columns(message: Message) -> tuple[list[str], list]:
    """The columns not imported, each with the value a new Recipient would be saved with.

    Computed as bulk_create computes them, so a field added to the model needs no change here.
    """
    template = Recipient(message_id=message.pk)
    fields = _other_fields()
    columns = [connection.ops.quote_name(f.column) for f in fields]
    values = [f.get_db_prep_save(f.pre_save(template, add=True), connection) for f in fields]
    return columns, values


# The suppression list's import (customers.suppression_csv) reads its files the same way.
CsvScan = _Scan
check_size = _check_size
