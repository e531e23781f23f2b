"""Packaging for liveupdate: pure Python plus C declarations read by cffi in
ABI mode, so it installs with or without a C compiler."""
from setuptools import find_packages, setup

setup(
    name="liveupdate",
    version="0.1.0",
    description="Linux Live Update (/dev/liveupdate) from Python: binding, kernel emulator and tools",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["liveupdate", "liveupdate.*"]) + ["liveupdate.cdefs"],
    # cdefs/ sits at the top of the repository, where C people look for it,
    # and is installed inside the package, where cffi reads it at import.
    package_dir={"liveupdate.cdefs": "cdefs"},
    package_data={"liveupdate": ["py.typed"], "liveupdate.cdefs": ["*.h"]},
    install_requires=["cffi>=1.15,<3"],
    extras_require={"test": ["pytest>=7,<10", "hypothesis>=6.100,<7"]},
    entry_points={
        "console_scripts": ["liveupdate = liveupdate.cli:main"],
    },
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)
