from setuptools import find_packages, setup

setup(
    name="nnunet-guide",
    version="0.1.0",
    description="Guide (click) and density channels for nnU-Net v2: one model, automatic and interactive",
    packages=find_packages(include=["nnunet_guide", "nnunet_guide.*"]),
    package_data={"nnunet_guide": ["_ext_trainers/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2==2.8.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "connected-components-3d>=3.12",  # cc3d; nnU-Net depends on it too (via acvl-utils)
        "SimpleITK>=2.2",
        "matplotlib>=3.6",
        "fastapi>=0.110",
        "uvicorn>=0.27",
        "blosc2>=2.5",
    ],
    extras_require={"test": ["pytest>=7", "nninteractive-client==2.6.0", "httpx>=0.24",
                             # the viewer test: napari-nninteractive's Remote mode under Xvfb
                             "napari==0.9.2", "napari-nninteractive==2.5.4", "napari-nifti==0.0.20",
                             "PyQt6==6.11.0"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_guide_env=nnunet_guide.cli.env:main",
            "nnUNetv2_guide_plan=nnunet_guide.cli.plan:main",
            "nnUNetv2_predict_guided=nnunet_guide.cli.predict:main",
            "nnUNetv2_guide_evaluate=nnunet_guide.cli.evaluate:main",
            "nnUNetv2_guide_demo=nnunet_guide.cli.demo:main",
            "nnUNetv2_guide_convert_lits=nnunet_guide.cli.convert_lits:main",
            "nnUNetv2_guide_server=nnunet_guide.cli.server:main",
        ]
    },
)
