"""The code location: `defs`, loaded by `dagster dev`, `dg`, the daemon and every run worker.

Loading must stay cheap (sensor ticks and the UI reload it constantly): resources here carry settings only;
the model is loaded inside runs.
"""

from dagster import Definitions, in_process_executor

from hy3d_pipeline.client_api import client_requests, image_to_model_job
from hy3d_pipeline.fleet.sensors import dead_runs_sensor
from hy3d_pipeline.images.sensors import new_images_sensor
from hy3d_pipeline.models.assets import image_to_model
from hy3d_pipeline.models.generators.base import known_generators
from hy3d_pipeline.models.resources import GeneratorResource
from hy3d_pipeline.settings import SettingsError, current
from hy3d_pipeline.storage.resources import ImageStorage


def build_defs() -> Definitions:
    # every setting parsed and checked here, as the location loads: a bad value fails now, naming the variable
    settings = current()
    if settings.generator not in known_generators():
        raise SettingsError(f"invalid configuration: HY3D_GENERATOR={settings.generator!r}: use one of "
                            f"{', '.join(known_generators())}, the installed backends (`hy3d-pipeline generators`)")
    # no default bucket: with nothing configured this would be AWS, where a bucket name is global and a default
    # one belongs to a stranger. Only the embedded default (`demo`/`dev`) names one, and sets S3_IMAGES_BUCKET
    # itself. Without it the location still loads; the sensor skips and runs fail, saying what to set.
    storage = ImageStorage.from_env()
    return Definitions(
        assets=[image_to_model],
        jobs=[image_to_model_job],
        sensors=[new_images_sensor, dead_runs_sensor, client_requests],
        resources={"storage": storage, "generator": GeneratorResource.from_env()},
        # a batch run is one step: a process per step would cost more than the work (measured: 0.2 s vs seconds)
        executor=in_process_executor,
    )


defs = build_defs()
