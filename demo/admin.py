from django.contrib import admin

from streaming.admin import StreamTaskAdmin

from .models import ContinueTask, ExampleTask

admin.site.register(ExampleTask, StreamTaskAdmin)
admin.site.register(ContinueTask, StreamTaskAdmin)
