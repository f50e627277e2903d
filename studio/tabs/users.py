"""Users tab (admins only): list accounts, add one, reset a password, change a role, (de)activate.

Every handler checks the admin role in the database from the signed-in session; the acting admin
is always `request.username`, never a value from the page.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.services.users import ROLES
from studio.tabs.common import ADMIN, DB_EVENTS, Shared, inert, requires, user_errors

COLUMNS = ["username", "role", "active", "created", "last sign-in"]


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def build(shared: Shared) -> dict:
    services = shared.services
    table = gr.Dataframe(
        headers=COLUMNS, interactive=False, datatype="str", label="Users", elem_id="users-table"
    )
    refresh_btn = gr.Button("Refresh", size="sm", elem_id="users-refresh")
    with gr.Accordion("Add a user", open=True, elem_id="users-add"):
        with gr.Row():
            new_name = gr.Textbox(label="Username", max_length=64, elem_id="users-new-name")
            new_role = gr.Dropdown(list(ROLES), value="annotator", label="Role", elem_id="users-new-role")
            new_password = gr.Textbox(
                label="Initial password (at least 8 characters)",
                type="password",
                elem_id="users-new-password",
            )
        add_btn = gr.Button("Add user", variant="primary", elem_id="users-add-button")
    with gr.Accordion("Change a user", open=True, elem_id="users-change"):
        # Any name may come back (the service checks it), so choices loaded later are not a filter.
        who = gr.Dropdown(label="User", choices=[], value=None, allow_custom_value=True, elem_id="users-who")
        with gr.Row():
            role = gr.Dropdown(list(ROLES), value=None, label="Role", elem_id="users-role")
            role_btn = gr.Button("Set role", elem_id="users-role-button")
        with gr.Row():
            password = gr.Textbox(label="New password", type="password", elem_id="users-password")
            password_btn = gr.Button("Reset password", elem_id="users-password-button")
        with gr.Row():
            deactivate_btn = gr.Button("Deactivate", variant="stop", elem_id="users-deactivate")
            activate_btn = gr.Button("Reactivate", elem_id="users-activate")
    status = gr.Markdown(elem_id="users-status")

    def listing(request: gr.Request, message: str = "") -> tuple:
        rows = services.users.list_users(request.username)
        frame = pd.DataFrame(
            [
                [
                    u.username,
                    u.role,
                    "yes" if u.is_active else "no",
                    _when(u.created_at),
                    _when(u.last_login_at),
                ]
                for u in rows
            ],
            columns=COLUMNS,
        )
        return frame, gr.update(choices=[u.username for u in rows]), message

    @user_errors
    @requires(shared, ADMIN)
    def refresh(request: gr.Request):
        return listing(request)

    @user_errors
    @requires(shared, ADMIN)
    def add(name_v, role_v, password_v, request: gr.Request):
        info = services.users.add_user(request.username, (name_v or "").strip(), role_v, password_v or "")
        return (*listing(request, f"Added **{inert(info.username)}** as {info.role}."), "", "")

    @user_errors
    @requires(shared, ADMIN)
    def set_role(who_v, role_v, request: gr.Request):
        if not who_v or not role_v:
            raise gr.Error("Choose a user and a role.")
        info = services.users.set_role(request.username, who_v, role_v)
        return listing(request, f"**{inert(info.username)}** is now {info.role}.")

    @user_errors
    @requires(shared, ADMIN)
    def set_password(who_v, password_v, request: gr.Request):
        if not who_v:
            raise gr.Error("Choose a user.")
        services.users.set_password(request.username, who_v, password_v or "")
        message = f"New password set for **{inert(who_v)}**; their open sessions have ended."
        return (*listing(request, message), "")

    def set_active(active: bool):
        @user_errors
        @requires(shared, ADMIN)
        def handler(who_v, request: gr.Request):
            if not who_v:
                raise gr.Error("Choose a user.")
            info = services.users.set_active(request.username, who_v, active)
            state = "reactivated" if info.is_active else "deactivated (they can no longer sign in)"
            return listing(request, f"**{inert(info.username)}** {state}.")

        return handler

    outputs = [table, who, status]
    refresh_btn.click(refresh, None, outputs, api_name="users_refresh", **DB_EVENTS)
    add_btn.click(
        add,
        [new_name, new_role, new_password],
        [*outputs, new_name, new_password],
        api_name="users_add",
        **DB_EVENTS,
    )
    role_btn.click(set_role, [who, role], outputs, api_name="users_set_role", **DB_EVENTS)
    password_btn.click(
        set_password, [who, password], [*outputs, password], api_name="users_set_password", **DB_EVENTS
    )
    deactivate_btn.click(set_active(False), [who], outputs, api_name="users_deactivate", **DB_EVENTS)
    activate_btn.click(set_active(True), [who], outputs, api_name="users_activate", **DB_EVENTS)
    return {"refresh": (refresh, [], outputs)}
