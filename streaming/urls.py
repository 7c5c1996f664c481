"""The dashboard's URLs: ``path("streaming/", include("streaming.urls"))`` in your URLconf.

Staff only by default (``STREAMING["DASHBOARD_ACCESS"]`` changes who); each
model's tasks need its view permission. See README "Dashboard".
"""

from django.urls import path

from .dashboard import views

app_name = "streaming"

urlpatterns = [
    path("", views.task_list, name="tasks"),
    path("tasks.json", views.task_rows, name="task-rows"),
    path("<str:app_label>/<str:model_name>/<str:pk>/", views.task_page, name="task"),
    path("<str:app_label>/<str:model_name>/<str:pk>/cancel", views.cancel_task, name="cancel"),
    path("<str:app_label>/<str:model_name>/<str:pk>/start", views.start_task, name="start"),
    path("<str:app_label>/<str:model_name>/<str:pk>/rerun", views.rerun_task, name="rerun"),
]
