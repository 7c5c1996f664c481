from django.contrib import admin
from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("admin/", admin.site.urls),
    path("streaming/", include("streaming.urls")),  # the live dashboard (staff only)
]
