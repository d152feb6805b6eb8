"""Scrub the provider block (with its credentials) out of every stored check-in answer.

Answers are now stored without it (wire.replayable) and a replay reads the account again; this
removes what older answers kept, with one UPDATE on each database we run on.
"""

from django.db import migrations

POSTGRES = """
UPDATE sending_worker
SET last_response = jsonb_set(last_response::jsonb, '{batch,provider}', 'null'::jsonb)
WHERE jsonb_typeof(last_response::jsonb -> 'batch' -> 'provider') = 'object'
"""

SQLITE = """
UPDATE sending_worker
SET last_response = json_set(last_response, '$.batch.provider', json('null'))
WHERE json_type(last_response, '$.batch.provider') = 'object'
"""


def scrub(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE)
    else:
        raise NotImplementedError(f"no scrub statement for {vendor}")


class Migration(migrations.Migration):
    dependencies = [("sending", "0005_drop_conductorlease_ticks")]

    operations = [migrations.RunPython(scrub, migrations.RunPython.noop, elidable=True)]
