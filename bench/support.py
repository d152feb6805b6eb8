"""What the benchmarks share: their database, recipients made in bulk, and deleting the customers
they made."""


def delete_customers(*, slug_prefix: str, account_prefix: str, customer_ids=None) -> None:
    """Delete the customers whose slug starts with `slug_prefix` (only `customer_ids` among them,
    if given) with their recipients, messages, workers, leases, minutes and send limits, and the
    provider accounts named with `account_prefix` that they used. Recipients go in one statement:
    a bench makes hundreds of thousands."""
    from django.db import connection, transaction

    from customers.models import Customer, ProviderAccount, SendLimit
    from sending.models import ConductorLease, CustomerMinute, Lease, Message, Worker

    customers = Customer.objects.filter(slug__startswith=slug_prefix)
    if customer_ids is not None:
        customers = customers.filter(pk__in=customer_ids)
    ids = list(customers.values_list("pk", flat=True))
    if not ids:
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "DELETE FROM sending_recipient WHERE message_id IN "
                "(SELECT id FROM sending_message WHERE customer_id = ANY(%s))",
                [ids],
            )
        for model in (Lease, Worker, CustomerMinute, ConductorLease, Message):
            model.objects.filter(customer_id__in=ids).delete()
        SendLimit.history.filter(customer_id__in=ids).delete()
        SendLimit.objects.filter(customer_id__in=ids).delete()
        accounts = set(
            Customer.objects.filter(pk__in=ids).values_list("provider_account_id", flat=True)
        )
        Customer.objects.filter(pk__in=ids).delete()
        # only("pk"): the credentials are never decrypted, so rows an earlier run left behind
        # under another FIELD_ENCRYPTION_KEY are deleted too.
        ProviderAccount.objects.filter(
            pk__in=[a for a in accounts if a], name__startswith=account_prefix
        ).only("pk").delete()


def ensure_database() -> None:
    """Create the PostgreSQL database DATABASE_URL names, if it does not exist yet."""
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    params = {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
    }
    try:
        psycopg.connect(**params, dbname=db["NAME"]).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    with psycopg.connect(**params, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')
    print(f"created database {db['NAME']}", flush=True)


def insert_queued_recipients(message_id: int, n: int) -> None:
    """n queued recipients for the message, by one INSERT ... SELECT generate_series, analyzed."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO sending_recipient
                (message_id, email, merge_data, status, attempts, provider_message_id,
                 last_error, sent_at)
            SELECT %s, 'r' || g || '@m' || %s || '.example',
                   jsonb_build_object('first_name', 'Student ' || g), 'queued', 0, '', '', NULL
            FROM generate_series(1, %s) AS g
            """,
            [message_id, message_id, n],
        )
        cursor.execute("ANALYZE sending_recipient")
