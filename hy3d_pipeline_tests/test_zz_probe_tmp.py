import sys
def test_p():
    print([p for p in sys.path[:4]])
    import hy3d_pipeline.models.generators.base
    import hy3d_pipeline_tests.tiny_hunyuan
