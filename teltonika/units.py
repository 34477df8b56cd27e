"""Units for durations, so that ``10 * SECONDS`` reads as what it is.

Twisted's clocks count seconds as floats; every timeout, interval and delay in this
package is written against this one constant.
"""

from __future__ import annotations

from typing import Final

SECONDS: Final = 1.0
