import pytest

from service.core.config import Config, ConfigError, with_stack_addresses

REQUIRED = {"DATABASE_URL": "postgresql://db/x", "REDIS_URL": "redis://r/0"}


def test_defaults_apply_when_only_the_servers_are_given():
    config = Config.from_env(REQUIRED)
    assert (config.RPM, config.PLAN_LEAD_SECONDS, config.MAX_ATTEMPTS) == (120, 2.0, 3)
    assert (config.SLOT_SECONDS, config.WINDOW_SLOTS) == (60, 15)
    assert config.API_TOKEN is None
    assert config.IDEMPOTENCY_KEY_HOURS == 24
    assert (config.MAX_PLAN_DAYS, config.SCHEDULE_AHEAD_MINUTES) == (30, 120)
    assert config.LOG_FORMAT == "text"


def test_values_are_converted_to_their_types():
    config = Config.from_env({**REQUIRED, "RPM": "5", "PLAN_LEAD_SECONDS": "0.5", "PACING": "off"})
    assert config.RPM == 5
    assert config.PLAN_LEAD_SECONDS == 0.5
    assert config.PACING is False


def test_the_driver_is_named_for_sqlalchemy():
    settings = Config.from_env(REQUIRED).flask_settings()
    assert settings["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://db/x"


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({"REDIS_URL": "redis://r/0"}, "DATABASE_URL is required"),
        ({**REQUIRED, "RPM": "many"}, "RPM must be a number"),
        ({**REQUIRED, "RPM": "0"}, "RPM must be at least 1"),
        ({**REQUIRED, "IDEMPOTENCY_KEY_HOURS": "0"}, "IDEMPOTENCY_KEY_HOURS must be at least 1"),
        ({**REQUIRED, "PLAN_LEAD_SECONDS": "-1"}, "must not be negative"),
        ({**REQUIRED, "ID_PROCESSOR": "no_colon"}, "module:function"),
        ({**REQUIRED, "PACING": "maybe"}, "true or false"),
        ({**REQUIRED, "PROCESSOR_HTTP_URL": "http://x/"}, "must hold {id}"),
        ({**REQUIRED, "LOG_FORMAT": "xml"}, "LOG_FORMAT must be text or json"),
        ({**REQUIRED, "API_TOKEN": "fifteen-chars.."}, "API_TOKEN must be at least 16"),
        ({**REQUIRED, "MAX_PLAN_DAYS": "0"}, "MAX_PLAN_DAYS must be at least 1"),
        ({**REQUIRED, "SCHEDULE_AHEAD_MINUTES": "0"}, "SCHEDULE_AHEAD_MINUTES must be at least 1"),
        (
            {**REQUIRED, "SCHEDULE_AHEAD_MINUTES": "1", "RECONCILE_INTERVAL_SECONDS": "30"},
            r"must cover at least 3 reconcile intervals \(90 s",
        ),
    ],
)
def test_a_bad_setting_stops_the_start(environ, complaint):
    with pytest.raises(ConfigError, match=complaint):
        Config.from_env(environ)


def test_a_running_stack_fills_in_only_the_addresses_left_unset(tmp_path):
    (tmp_path / "stack.env").write_text(
        "DATABASE_URL=postgresql://stack/db\nREDIS_URL=redis://stack/0\n"
    )
    environ = {"VAR_DIR": str(tmp_path), "REDIS_URL": "redis://mine/1", "RPM": "7"}
    filled = with_stack_addresses(environ)
    assert filled["DATABASE_URL"] == "postgresql://stack/db"
    assert filled["REDIS_URL"] == "redis://mine/1"
    assert filled["RPM"] == "7"
    assert with_stack_addresses({"VAR_DIR": str(tmp_path / "none")}) == {
        "VAR_DIR": str(tmp_path / "none")
    }
