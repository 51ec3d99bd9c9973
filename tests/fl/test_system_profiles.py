"""Client system profiles (fl/system/profiles.py, no Ray): seeded draws, the availability cycle,
trace files (real CSVs) and every bad trace refused with its file, row (= line number) and column."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from cxrfl_ray.config import ConfigError, SystemConfig
from cxrfl_ray.fl.system.profiles import (Availability, draw_profiles, read_availability_trace, read_profile_trace,
                                          transfer_seconds)


def system(**fields) -> SystemConfig:
    return SystemConfig.model_validate(fields)


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def refused(match: str):
    return pytest.raises(ConfigError, match=match)


# --- seeded draws ---------------------------------------------------------------------------------

HETEROGENEOUS = {"speed": {"distribution": "two_speed", "slow_share": 0.3, "slow_factor": 4.0},
                 "bandwidth_sigma": 0.5, "availability": {"online_share": 0.5, "period_s": 3600}}


def test_draws_are_a_function_of_config_and_seed():
    cfg = system(**HETEROGENEOUS)
    a, b, other = draw_profiles(cfg, 1000, 3), draw_profiles(cfg, 1000, 3), draw_profiles(cfg, 1000, 4)
    for name in ("speed", "up_mbps", "down_mbps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(other, name)), name
    np.testing.assert_array_equal(a.availability.phase, b.availability.phase)
    assert not np.array_equal(a.availability.phase, other.availability.phase)
    assert a.num_clients == 1000 and a.speed.dtype == np.float64
    assert ((a.availability.phase >= 0) & (a.availability.phase < 1)).all()
    lognormal = system(speed={"distribution": "lognormal", "sigma": 0.7})
    np.testing.assert_array_equal(draw_profiles(lognormal, 500, 1).speed, draw_profiles(lognormal, 500, 1).speed)
    assert not np.array_equal(draw_profiles(lognormal, 500, 1).speed, draw_profiles(lognormal, 500, 2).speed)


@pytest.mark.parametrize("n, share", [(1000, 0.3), (10, 0.25), (7, 0.5), (50, 0.0), (50, 1.0)])
def test_two_speed_has_exactly_the_share_of_slow_clients(n, share):
    p = draw_profiles(system(speed={"distribution": "two_speed", "slow_share": share, "slow_factor": 6.0}), n, 0)
    slow = p.speed == 6.0
    assert slow.sum() == round(share * n)
    assert (p.speed[~slow] == 1.0).all()


def test_lognormal_speed_has_median_one_and_the_configured_spread():
    p = draw_profiles(system(speed={"distribution": "lognormal", "sigma": 0.5}), 100_000, 0)
    assert abs(np.median(p.speed) - 1) < 0.01
    assert abs(np.log(p.speed).std() - 0.5) < 0.01
    assert (p.speed > 0).all()


def test_constant_speed_and_no_bandwidth_spread_give_the_configured_values():
    p = draw_profiles(system(up_mbps=8, down_mbps=50, bandwidth_sigma=0), 1000, 5)
    assert (p.speed == 1).all() and (p.up_mbps == 8).all() and (p.down_mbps == 50).all()
    spread = draw_profiles(system(up_mbps=8, down_mbps=50, bandwidth_sigma=0.4), 100_000, 5)
    assert abs(np.median(spread.up_mbps) / 8 - 1) < 0.01 and abs(np.median(spread.down_mbps) / 50 - 1) < 0.01
    assert abs(np.log(spread.up_mbps).std() - 0.4) < 0.01
    assert not np.array_equal(spread.up_mbps / 8, spread.down_mbps / 50)  # the two links are drawn apart


# --- the availability cycle -----------------------------------------------------------------------

def test_the_cycle_by_hand():
    # online iff ((t / 100 + phase) mod 1) < 0.25
    a = Availability(0.25, 100.0, np.array([0.0, 0.5, 0.8, 0.9]))
    expected = {
        0.0: [True, False, False, False],     # 0, .5, .8, .9
        15.0: [True, False, False, True],     # .15, .65, .95, .05
        30.0: [False, False, True, True],     # .3, .8, .1, .2
        60.0: [False, True, False, False],    # .6, .1, .4, .5
        260.0: [False, True, False, False],   # 2.6 -> .6, .1, .4, .5 (the cycle repeats)
        24.9: [True, False, True, True],      # .249, .749, .049 (1.049), .149
        25.0: [False, False, True, True],     # .25: the online share ends (exclusive)
    }
    for t, mask in expected.items():
        assert a.online(t).tolist() == mask, t
    assert a.online(15.0, np.array([3, 0, 2])).tolist() == [True, True, False]  # a subset, in its order
    assert Availability(1.0, 100.0, np.array([0.3, 0.99])).online(12345.0).tolist() == [True, True]


def test_drawn_phases_follow_the_cycle_and_a_quarter_is_online():
    a = draw_profiles(system(availability={"online_share": 0.25, "period_s": 100}), 100_000, 0).availability
    for t in (0.0, 37.5, 99.0, 1234.5):
        mask = a.online(t)
        for c in (0, 1, 17, 99_999):
            assert mask[c] == (math.fmod(t / 100 + float(a.phase[c]), 1.0) < 0.25), (t, c)
        assert abs(mask.mean() - 0.25) < 0.01
    one = np.array([a.online(float(t), np.array([42]))[0] for t in np.arange(0, 10_000, 0.7)])
    assert abs(one.mean() - 0.25) < 0.01  # and each client is online a quarter of the time


# --- traces ---------------------------------------------------------------------------------------

def test_a_profile_trace_replaces_the_draws_in_client_order(tmp_path):
    trace = write(tmp_path / "profiles.csv", "client,speed,up_mbps,down_mbps",
                  "2,3.5,5,50", "0,1,20,100", "3,0.5,1.5,7", "1,10,2,30")
    cfg = system(speed={"distribution": "lognormal"}, bandwidth_sigma=1.0, profile_trace=str(trace))
    p = draw_profiles(cfg, 4, 0)
    assert p.speed.tolist() == [1, 10, 3.5, 0.5]
    assert p.up_mbps.tolist() == [20, 2, 5, 1.5]
    assert p.down_mbps.tolist() == [100, 30, 50, 7]
    assert p.speed.dtype == p.up_mbps.dtype == np.float64
    np.testing.assert_array_equal(p.speed, draw_profiles(cfg, 4, 9).speed)  # the seed no longer matters


def test_a_profile_trace_tolerates_spaces_a_bom_and_blank_lines(tmp_path):
    trace = tmp_path / "profiles.csv"
    trace.write_bytes("\ufeffclient, speed ,up_mbps,down_mbps\n 1 ,2,3,4\n\n0,1e0,2.5,40\n".encode())
    speed, up, down = read_profile_trace(trace, 2)
    assert speed.tolist() == [1, 2] and up.tolist() == [2.5, 3] and down.tolist() == [40, 4]


AVAILABILITY = ("client,start_s,end_s",
                "2,5,15",      # line 2
                "0,20,30",     # line 3
                "0,0,10",      # line 4
                "4,10,20",     # line 5: touches its next interval, no overlap
                "4,0,10")      # line 6


def test_an_availability_trace_gives_the_intervals_start_inclusive_end_exclusive(tmp_path):
    trace = write(tmp_path / "online.csv", *AVAILABILITY)
    a = draw_profiles(system(availability={"trace": str(trace)}), 5, 0).availability
    expected = {  # clients 1 and 3 are not in the trace: always online (the default cycle)
        -1.0: [False, True, False, True, False],
        0.0: [True, True, False, True, True],
        4.999: [True, True, False, True, True],
        5.0: [True, True, True, True, True],
        10.0: [False, True, True, True, True],   # client 0's [0, 10) is over; client 4 is in [10, 20)
        15.0: [False, True, False, True, True],
        19.999: [False, True, False, True, True],
        20.0: [True, True, False, True, False],
        29.5: [True, True, False, True, False],
        30.0: [False, True, False, True, False],
        1e9: [False, True, False, True, False],
    }
    for t, mask in expected.items():
        assert a.online(t).tolist() == mask, t
    assert a.online(5.0, np.array([4, 2, 1])).tolist() == [True, True, True]
    assert a.online(15.0, np.array([2, 0])).tolist() == [False, False]
    traced, indptr, start, end = read_availability_trace(trace, 5)
    assert traced.tolist() == [True, False, True, False, True]
    assert indptr.tolist() == [0, 2, 2, 3, 3, 5]
    assert start.tolist() == [0, 20, 5, 0, 10] and end.tolist() == [10, 30, 15, 10, 20]


def test_clients_not_in_the_availability_trace_follow_the_cycle(tmp_path):
    trace = write(tmp_path / "online.csv", *AVAILABILITY)
    cfg = system(availability={"trace": str(trace), "online_share": 0.25, "period_s": 100})
    a = draw_profiles(cfg, 5, 0).availability
    for t in (0.0, 5.0, 12.0, 25.0, 40.0, 77.0, 150.0):
        mask = a.online(t)
        for c in (1, 3):
            assert mask[c] == (math.fmod(t / 100 + float(a.phase[c]), 1.0) < 0.25), (t, c)
        for c, intervals in {0: [(0, 10), (20, 30)], 2: [(5, 15)], 4: [(0, 10), (10, 20)]}.items():
            assert mask[c] == any(lo <= t < hi for lo, hi in intervals), (t, c)


def test_an_availability_trace_of_many_clients_matches_a_plain_loop(tmp_path):
    rng = np.random.default_rng(0)
    rows, intervals = ["client,start_s,end_s"], {}
    for c in range(0, 3000, 2):  # odd clients untraced
        edges = np.cumsum(rng.integers(1, 100, 8)).tolist()  # whole seconds: exact in the CSV
        intervals[c] = [(float(edges[i]), float(edges[i + 1])) for i in range(0, 8, 2)]
        rows += [f"{c},{lo:g},{hi:g}" for lo, hi in intervals[c]]
    order = rng.permutation(len(rows) - 1) + 1
    trace = write(tmp_path / "online.csv", rows[0], *[rows[i] for i in order])
    a = draw_profiles(system(availability={"trace": str(trace), "online_share": 0.5, "period_s": 50}), 3001, 1) \
        .availability
    edges = [x for interval in intervals[8] for x in interval]  # exactly at a start (online) and an end (offline)
    for t in [0.0, 1.0, 50.0, 123.4, 250.0, 399.0, 1000.0, *edges]:
        mask = a.online(t)
        want = [any(lo <= t < hi for lo, hi in intervals[c]) if c in intervals
                else math.fmod(t / 50 + float(a.phase[c]), 1.0) < 0.5 for c in range(3001)]
        assert mask.tolist() == want, t
        subset = np.array([8, 3, 3000, 8, 1])
        assert a.online(t, subset).tolist() == [want[c] for c in subset], t


# --- bad traces -----------------------------------------------------------------------------------

def test_a_missing_trace_file_is_named(tmp_path):
    with refused(re.escape(f"system.profile_trace {tmp_path / 'nope.csv'}: no such file")):
        draw_profiles(system(profile_trace=str(tmp_path / "nope.csv")), 3, 0)
    with refused(re.escape(f"system.availability.trace {tmp_path / 'nope.csv'}: no such file")):
        draw_profiles(system(availability={"trace": str(tmp_path / "nope.csv")}), 3, 0)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with refused(re.escape(f"system.profile_trace {empty}: empty file")):
        read_profile_trace(empty, 3)


@pytest.mark.parametrize("header", ["client,speed,up,down", "client,speed,down_mbps,up_mbps", "client,speed,up_mbps",
                                    "client,speed,up_mbps,down_mbps,extra"])
def test_wrong_profile_columns_are_named(tmp_path, header):
    trace = write(tmp_path / "p.csv", header, "0,1,2,3,4"[: 2 * len(header.split(",")) - 1])
    names = [n.strip() for n in header.split(",")]
    with refused(re.escape(f"system.profile_trace {trace}: columns {names}, expected exactly "
                           "client,speed,up_mbps,down_mbps")):
        read_profile_trace(trace, 1)


def test_wrong_availability_columns_are_named(tmp_path):
    trace = write(tmp_path / "a.csv", "client,start,end", "0,0,1")
    with refused(re.escape(f"system.availability.trace {trace}: columns ['client', 'start', 'end'], expected "
                           "exactly client,start_s,end_s")):
        read_availability_trace(trace, 1)


def test_a_row_with_too_many_fields_is_named_by_its_line(tmp_path):
    # pandas would silently take the first column as an index when the first data row is longer
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100,5", "1,1,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: row 2 has 5 fields, expected 4 "
                           "(client,speed,up_mbps,down_mbps)")):
        read_profile_trace(trace, 2)
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "0,0,1", "", "1,0,1,9")
    with refused(re.escape(f"system.availability.trace {trace}: row 4 has 4 fields, expected 3")):
        read_availability_trace(trace, 2)


@pytest.mark.parametrize("client", ["1.5", "a", "-1", "", "1e3"])
def test_a_client_id_that_is_not_a_whole_number_is_named_by_its_row(tmp_path, client):
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100", f"{client},1,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: row 3, client {client!r} is not a client id "
                           "(a whole number >= 0)")):
        read_profile_trace(trace, 2)
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "0,0,1", "1,0,1", f"{client},5,6")
    with refused(re.escape(f"system.availability.trace {trace}: row 4, client {client!r} is not a client id")):
        read_availability_trace(trace, 2)


def test_an_unknown_client_is_named_by_its_row(tmp_path):
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100", "1,1,20,100", "3,1,20,100",
                  "5,1,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: row 4, client 3 is not a plan client (0..2); "
                           "2 row(s) name unknown clients")):
        read_profile_trace(trace, 3)
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "0,0,1", "", "7,0,1")
    with refused(re.escape(f"system.availability.trace {trace}: row 4, client 7 is not a plan client (0..2); "
                           "1 row(s)")):
        draw_profiles(system(availability={"trace": str(trace)}), 3, 0)


@pytest.mark.parametrize("column", ["speed", "up_mbps", "down_mbps"])
@pytest.mark.parametrize("value", ["-1", "nan", "NaN", "0", "0.0", "inf", "", "fast"])
def test_a_speed_or_bandwidth_that_is_not_positive_is_named_by_row_and_column(tmp_path, column, value):
    good = {"speed": "1", "up_mbps": "20", "down_mbps": "100"}
    bad = {**good, column: value}
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100", "1,1,20,100",
                  f"2,{bad['speed']},{bad['up_mbps']},{bad['down_mbps']}")
    with refused(re.escape(f"system.profile_trace {trace}: row 4, {column} {value!r} is not a finite number > 0")):
        draw_profiles(system(profile_trace=str(trace)), 3, 0)


def test_a_duplicate_client_in_the_profile_trace_names_both_rows(tmp_path):
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100", "1,1,20,100", "2,1,20,100",
                  "1,2,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: rows 3 and 5 both list client 1 (one row per client)")):
        read_profile_trace(trace, 3)


def test_a_client_missing_from_the_profile_trace_is_named(tmp_path):
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "2,1,20,100", "0,1,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: 3 plan client(s) have no row, e.g. 1, 3, 4 "
                           "(one row per client 0..4)")):
        read_profile_trace(trace, 5)


@pytest.mark.parametrize("start, end", [("5", "5"), ("5", "4.5")])
def test_an_interval_that_does_not_end_after_its_start_is_named_by_its_row(tmp_path, start, end):
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "0,0,1", "1,0,1", f"1,{start},{end}")
    with refused(re.escape(f"system.availability.trace {trace}: row 4, client 1: end_s {float(end):g} is not after "
                           f"start_s {float(start):g}")):
        read_availability_trace(trace, 2)


def test_overlapping_intervals_of_one_client_name_both_rows(tmp_path):
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "1,50,60", "0,0,100", "1,0,10", "0,120,130",
                  "0,90,95")
    with refused(re.escape(f"system.availability.trace {trace}: client 0: rows 3 and 6 overlap ([0, 100) and "
                           "[90, 95))")):
        read_availability_trace(trace, 2)
    nested = write(tmp_path / "b.csv", "client,start_s,end_s", "0,10,20", "0,0,100")
    with refused(re.escape(f"system.availability.trace {nested}: client 0: rows 3 and 2 overlap ([0, 100) and "
                           "[10, 20))")):
        read_availability_trace(nested, 1)


@pytest.mark.parametrize("column, value", [("start_s", "-1"), ("start_s", "nan"), ("start_s", ""),
                                           ("end_s", "inf"), ("end_s", "0"), ("end_s", "-3")])
def test_a_bad_interval_time_is_named_by_row_and_column(tmp_path, column, value):
    row = {"start_s": "0", "end_s": "10", column: value}
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "0,0,5", f"1,{row['start_s']},{row['end_s']}")
    need = "a finite number >= 0" if column == "start_s" else "a finite number > 0"
    with refused(re.escape(f"system.availability.trace {trace}: row 3, {column} {value!r} is not {need}")):
        read_availability_trace(trace, 2)


def test_row_numbers_are_line_numbers_counting_blank_lines(tmp_path):
    trace = write(tmp_path / "p.csv", "client,speed,up_mbps,down_mbps", "0,1,20,100", "", "  ", "1,-2,20,100")
    with refused(re.escape(f"system.profile_trace {trace}: row 5, speed '-2' is not a finite number > 0")):
        read_profile_trace(trace, 2)
    trace = write(tmp_path / "a.csv", "client,start_s,end_s", "", "0,0,10", "", "0,5,20")
    with refused(re.escape(f"system.availability.trace {trace}: client 0: rows 3 and 5 overlap")):
        read_availability_trace(trace, 1)
    lines = ["client,start_s,end_s"] + [f"{c},0,1" for c in range(40)] + ["12,3,2"]
    trace = write(tmp_path / "long.csv", *lines)
    assert trace.read_text().splitlines()[41] == "12,3,2"  # line 42
    with refused(re.escape(f"system.availability.trace {trace}: row 42, client 12: end_s 2 is not after start_s 3")):
        read_availability_trace(trace, 40)


# --- transfers ------------------------------------------------------------------------------------

def test_transfer_seconds_by_hand():
    assert transfer_seconds(1_000_000, np.float64(8.0)) == pytest.approx(1.0)  # 8 Mbit at 8 Mbit/s
    # resnet18's 44.7 MB update over a 20 Mbit/s uplink: 44.7e6 * 8 / 20e6 = 17.88 s
    assert transfer_seconds(44_700_000, np.float64(20.0)) == pytest.approx(17.88)
    np.testing.assert_allclose(transfer_seconds(125_000, np.array([1.0, 10.0, 0.5])), [1.0, 0.1, 2.0])
    np.testing.assert_allclose(transfer_seconds(np.array([0, 250_000]), np.array([2.0, 2.0])), [0.0, 1.0])
