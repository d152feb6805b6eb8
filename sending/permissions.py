"""Who may watch and who may steer the live pages."""

# Support and Operators both hold these; steering takes more (may_steer).
WATCH_PERMISSIONS = ("sending.view_message", "customers.view_sendlimit")
STEER_PERMISSION = "customers.change_sendlimit"


def may_watch(user) -> bool:
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_active
        and user.is_staff
        and user.has_perms(WATCH_PERMISSIONS)
    )


def may_steer(user) -> bool:
    return may_watch(user) and user.has_perm(STEER_PERMISSION)
